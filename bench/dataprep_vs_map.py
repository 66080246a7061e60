"""Tokenization throughput: `llmkit data-prep` vs `datasets.map(batched=True)` on the same JSONL files.

Both use the same fast tokenizer. datasets loads the JSON into Arrow and maps the tokenizer over batches
(no cleaning, dedup or packing); llmkit reads, cleans, deduplicates, splits, tokenizes, packs and writes
shards. Each runs in a process of its own (a tokenizer used before a fork would run single-threaded in the
children), timed from after its libraries are imported and the tokenizer loaded. Prints the wall time of each and
the ratio (datasets time / llmkit time: above 1 means llmkit is faster), once with one process each and once with
`--num-proc` processes each.

    python bench/dataprep_vs_map.py [--docs 200000] [--files 4] [--num-proc 2]
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")

from _cli import apart_arguments, report, run_apart, scratch  # noqa: E402  (bench/_cli.py)

from llmkit.config import DataConfig  # noqa: E402
from llmkit.data.corpus import STORIES, generate  # noqa: E402
from llmkit.data.prep import prepare_dataset  # noqa: E402
from llmkit.data.tokenizer import train_bpe  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--docs", type=int, default=200_000)
    parser.add_argument("--files", type=int, default=4)
    parser.add_argument("--num-proc", type=int, default=2)
    apart_arguments(parser, ["map", "llmkit"])
    args = parser.parse_args()
    work = args.work or scratch("llmkit-bench-")
    files = [work / f"part-{i}.jsonl" for i in range(args.files)]
    if args.run:
        run = run_datasets_map if args.run == "map" else run_llmkit
        seconds, tokens = run(files, work, args.num_proc)
        report({"seconds": seconds, "tokens": tokens}, args.result)
        return

    texts = [doc.text for doc in generate(STORIES, args.docs, seed=0)]
    for i, path in enumerate(files):
        path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts[i :: args.files]))
    size = sum(p.stat().st_size for p in files)
    tokenizer = train_bpe(texts[:20_000], vocab_size=2048)
    tokenizer.save_pretrained(work / "tokenizer")
    print(
        f"{args.docs:,} documents in {args.files} JSONL files ({size / 2**20:.1f} MiB), "
        f"tokenizer vocab {len(tokenizer)}"
    )
    script = str(Path(__file__).resolve())
    for num_proc in sorted({1, args.num_proc}):
        same = ["--work", str(work), "--files", str(args.files), "--num-proc", str(num_proc)]
        theirs, ours = run_apart(script, "map", same, 3600), run_apart(script, "llmkit", same, 3600)
        if ours is None or theirs is None:
            raise SystemExit("no result (the output is above)")
        print(f"num_proc={num_proc}")
        print(f"  datasets.map:    {theirs['seconds']:6.2f}s  {theirs['tokens'] / theirs['seconds']:>11,.0f} tokens/s")
        print(f"  llmkit data-prep:{ours['seconds']:6.2f}s  {ours['tokens'] / ours['seconds']:>11,.0f} tokens/s")
        print(f"  ratio datasets time / llmkit time: {theirs['seconds'] / ours['seconds']:.2f}x")


def run_llmkit(files: list[Path], work: Path, num_proc: int) -> tuple[float, int]:
    import datatrove.executor  # noqa: F401  (imported and the tokenizer loaded before the clock, as for datasets.map)

    from llmkit.data.tokenizer import load_tokenizer

    load_tokenizer(work / "tokenizer")
    cfg = DataConfig(
        sources=[str(p) for p in files], tokenizer=str(work / "tokenizer"), block_size=128,
        val_fraction=0.01, workers=num_proc,
    )  # fmt: skip
    start = time.perf_counter()
    result = prepare_dataset(cfg, work / f"llmkit-{num_proc}")
    seconds = time.perf_counter() - start
    return seconds, sum(split["tokens"] for split in result.manifest["splits"].values())


def run_datasets_map(files: list[Path], work: Path, num_proc: int) -> tuple[float, int]:
    import datasets
    from transformers import AutoTokenizer

    tokenizer, cache = AutoTokenizer.from_pretrained(work / "tokenizer"), work / f"hf-cache-{num_proc}"
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
