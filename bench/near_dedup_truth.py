"""Near-dedup on known truth: recall per kind of planted copy and precision, at several thresholds.

The corpus is llmkit.data.planted: story pages, 30% of them with one planted copy (a few words edited, paragraphs
reordered, or boilerplate around the page), every copy later than its original, and 10% with a related page that
shares half its paragraphs (Jaccard about 0.3: not a duplicate, to be kept). `llmkit data-prep` runs with
near-dedup at each threshold; the pages left in the packed dataset are decoded and compared with the truth.
Recall: planted copies removed / planted copies (by kind). Precision: planted copies removed / pages removed.

    python bench/near_dedup_truth.py [--originals 1000] [--thresholds 0.6 0.7 0.8 0.9]
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from transformers import AutoTokenizer

from llmkit.config import DataConfig
from llmkit.data.cleaning import clean_text
from llmkit.data.planted import KINDS, planted_corpus
from llmkit.data.prep import prepare_dataset
from llmkit.data.store import open_dataset


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--originals", type=int, default=1000)
    parser.add_argument("--thresholds", type=float, nargs="+", default=[0.6, 0.7, 0.8, 0.9])
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="llmkit-near-dedup-"))
    planted = planted_corpus(args.originals, seed=11)
    source = work / "pages.jsonl"
    last = ["A last page, cut short by the final partial block in place of a page that counts. " * 4]
    lines = (json.dumps({"text": text}) + "\n" for text in planted.texts + last)
    source.write_text("".join(lines), encoding="utf-8")
    cleaned = [clean_text(text, "NFC") for text in planted.texts]
    print(f"{len(planted.texts):,} pages, {len(planted.copies):,} planted copies")
    print(f"{len(planted.related):,} related pages (half their paragraphs shared with an earlier page: to keep)")
    header = " | ".join(f"recall {k}" for k in KINDS)
    print(f"| threshold | bands x rows | {header} | recall | precision | related pages removed |")
    print("| --- | --- |" + " --- |" * (len(KINDS) + 3))
    for threshold in args.thresholds:
        cfg = DataConfig(sources=[str(source)], vocab_size=1024, block_size=16, val_fraction=0.0,
                         near_dedup={"enabled": True, "threshold": threshold})  # fmt: skip
        out = work / f"t{threshold}"
        manifest = prepare_dataset(cfg, out).manifest
        left = set(decoded(out))
        gone = {copy for copy in planted.copies if cleaned[copy] not in left}
        related_lost = sum(cleaned[page] not in left for page in planted.related)
        by_kind = [
            sum(c in gone for c, k in planted.kinds.items() if k == kind) / list(planted.kinds.values()).count(kind)
            for kind in KINDS
        ]
        removed = manifest["documents"]["dropped"].get("near_duplicate", 0)
        near = manifest["curation"]["near_dedup"]
        print(
            f"| {threshold} | {near['bands']} x {near['rows']} | " + " | ".join(f"{r:.3f}" for r in by_kind)
            + f" | {len(gone) / len(planted.copies):.3f} | {len(gone) / max(1, removed):.3f} | {related_lost} |"
        )  # fmt: skip


def decoded(dataset: Path) -> list[str]:
    prepared = open_dataset(dataset)
    tokenizer = AutoTokenizer.from_pretrained(prepared.tokenizer_dir)
    packed = prepared.split("train")
    tokens = packed.blocks(list(range(len(packed)))).reshape(-1).tolist()
    return tokenizer.decode(tokens).split(tokenizer.eos_token)


if __name__ == "__main__":
    main()
