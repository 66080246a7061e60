"""Near-dedup on known truth: recall per kind of planted copy and precision, then recall by true similarity.

The corpus is llmkit.data.planted: story pages, 30% of them with one planted copy (a few words edited, paragraphs
reordered, or boilerplate around the page), every copy later than its original, and 10% with a related page that
shares half its paragraphs (Jaccard about 0.3: not a duplicate, to be kept). `llmkit data-prep` runs with
near-dedup at each threshold; the pages left in the packed dataset are decoded and compared with the truth.
Recall: planted copies removed / planted copies (by kind). Precision: planted copies removed / pages removed.
Then llmkit.data.planted.graded_copies: every page gets one copy with a share of its words replaced, so the copies'
true word-5-gram Jaccard similarities (computed with the MinHash's own shingles) cover 0.4 to 1; the table gives,
per band of true similarity, the share of copies removed.

    python bench/near_dedup_truth.py [--originals 1000] [--thresholds 0.6 0.7 0.8 0.9] [--graded 1000]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from _cli import scratch  # bench/_cli.py (run as python bench/NAME.py)
from transformers import AutoTokenizer

from llmkit.config import DataConfig, NearDedupConfig
from llmkit.data.cleaning import clean_text
from llmkit.data.curate import Shingles, jaccard
from llmkit.data.planted import KINDS, graded_copies, planted_corpus
from llmkit.data.prep import prepare_dataset
from llmkit.data.store import open_dataset


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--originals", type=int, default=1000)
    parser.add_argument("--thresholds", type=float, nargs="+", default=[0.6, 0.7, 0.8, 0.9])
    parser.add_argument("--graded", type=int, default=1000, help="Pages with one graded copy each (0: skip).")
    args = parser.parse_args()
    work = scratch("llmkit-near-dedup-")
    planted_table(args, work)
    if args.graded:
        graded_table(args, work)


def planted_table(args: argparse.Namespace, work: Path) -> None:
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


def graded_table(args: argparse.Namespace, work: Path) -> None:
    graded = graded_copies(args.graded, seed=5)
    source = work / "graded.jsonl"
    last = ["A last page, cut short by the final partial block in place of a page that counts. " * 4]
    source.write_text("".join(json.dumps({"text": text}) + "\n" for text in graded.texts + last), encoding="utf-8")
    cleaned = [clean_text(text, "NFC") for text in graded.texts]
    shingles = Shingles(NearDedupConfig(enabled=True), work / "scratch")
    truth = {copy: jaccard(shingles(cleaned[copy]), shingles(cleaned[original]))
             for copy, original in graded.copies.items()}  # fmt: skip
    edges = [round(0.4 + 0.05 * i, 2) for i in range(13)]
    bins = list(zip(edges[:-1], edges[1:], strict=True))
    print(f"\n{len(graded.copies):,} graded copies; share removed by true Jaccard similarity to the original:")
    print("| threshold | bands x rows | " + " | ".join(f"{lo:.2f}-{hi:.2f}" for lo, hi in bins) + " |")
    print("| --- | --- |" + " --- |" * len(bins))
    counts = [sum(lo <= s < hi for s in truth.values()) for lo, hi in bins]
    print("| pairs | |" + "".join(f" {n} |" for n in counts))
    for threshold in args.thresholds:
        cfg = DataConfig(sources=[str(source)], vocab_size=1024, block_size=16, val_fraction=0.0,
                         near_dedup={"enabled": True, "threshold": threshold})  # fmt: skip
        out = work / f"graded-{threshold}"
        near = prepare_dataset(cfg, out).manifest["curation"]["near_dedup"]
        left = set(decoded(out))
        originals_lost = sum(cleaned[original] not in left for original in graded.copies.values())
        cells = []
        for (lo, hi), n in zip(bins, counts, strict=True):
            gone = sum(cleaned[c] not in left for c, s in truth.items() if lo <= s < hi)
            cells.append(f"{gone / n:.2f}" if n else "-")
        print(f"| {threshold} | {near['bands']} x {near['rows']} | " + " | ".join(cells) + " |"
              + (f" ({originals_lost} originals lost)" if originals_lost else ""))  # fmt: skip


def decoded(dataset: Path) -> list[str]:
    prepared = open_dataset(dataset)
    tokenizer = AutoTokenizer.from_pretrained(prepared.tokenizer_dir)
    packed = prepared.split("train")
    tokens = packed.blocks(list(range(len(packed)))).reshape(-1).tolist()
    return tokenizer.decode(tokens).split(tokenizer.eos_token)


if __name__ == "__main__":
    main()
