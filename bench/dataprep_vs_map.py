"""Tokenization throughput: `llmkit data-prep` vs `datasets.map(batched=True)` on the same JSONL files.

Both use the same fast tokenizer. datasets loads the JSON into Arrow and maps the tokenizer over batches
(no cleaning, dedup or packing); llmkit reads, cleans, deduplicates, splits, tokenizes, packs and writes
shards. Prints the wall time of each and the ratio (datasets time / llmkit time: above 1 means llmkit is
faster), once with one process each and once with `--num-proc` processes each.

    python bench/dataprep_vs_map.py [--docs 200000] [--files 4] [--num-proc 2]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")

from llmkit.config import DataConfig  # noqa: E402
from llmkit.data.corpus import STORIES, generate  # noqa: E402
from llmkit.data.prep import prepare_dataset  # noqa: E402
from llmkit.data.tokenizer import train_bpe  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--docs", type=int, default=200_000)
    parser.add_argument("--files", type=int, default=4)
    parser.add_argument("--num-proc", type=int, default=2)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="llmkit-bench-"))

    texts = [doc.text for doc in generate(STORIES, args.docs, seed=0)]
    files = []
    for i in range(args.files):
        path = work / f"part-{i}.jsonl"
        path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts[i :: args.files]))
        files.append(path)
    size = sum(p.stat().st_size for p in files)
    tokenizer = train_bpe(texts[:20_000], vocab_size=2048)
    tokenizer.save_pretrained(work / "tokenizer")
    print(
        f"{args.docs:,} documents in {args.files} JSONL files ({size / 2**20:.1f} MiB), "
        f"tokenizer vocab {len(tokenizer)}"
    )

    for num_proc in sorted({1, args.num_proc}):
        map_seconds, map_tokens = run_datasets_map(files, work / "tokenizer", work / f"hf-cache-{num_proc}", num_proc)
        cfg = DataConfig(
            sources=[str(p) for p in files], tokenizer=str(work / "tokenizer"), block_size=128,
            val_fraction=0.01, num_proc=num_proc,
        )  # fmt: skip
        start = time.perf_counter()
        result = prepare_dataset(cfg, work / f"llmkit-{num_proc}")
        llmkit_seconds = time.perf_counter() - start
        llmkit_tokens = sum(split["tokens"] for split in result.manifest["splits"].values())
        print(f"num_proc={num_proc}")
        print(f"  datasets.map:    {map_seconds:6.2f}s  {map_tokens / map_seconds:>11,.0f} tokens/s")
        print(f"  llmkit data-prep:{llmkit_seconds:6.2f}s  {llmkit_tokens / llmkit_seconds:>11,.0f} tokens/s")
        print(f"  ratio datasets time / llmkit time: {map_seconds / llmkit_seconds:.2f}x")


def run_datasets_map(files: list[Path], tokenizer_dir: Path, cache: Path, num_proc: int) -> tuple[float, int]:
    import datasets
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    start = time.perf_counter()
    dataset = datasets.load_dataset("json", data_files=[str(p) for p in files], split="train", cache_dir=str(cache))
    tokenized = dataset.map(
        lambda batch: tokenizer(batch["text"]), batched=True, num_proc=num_proc if num_proc > 1 else None,
        remove_columns=["text"], load_from_cache_file=False,
    )  # fmt: skip
    seconds = time.perf_counter() - start  # counting tokens below is not part of the work
    tokens = sum(len(ids) for ids in tokenized["input_ids"])
    return seconds, tokens


if __name__ == "__main__":
    main()
