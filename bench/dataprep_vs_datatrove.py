"""Curation at corpus scale: `llmkit data-prep` against a datatrove pipeline doing the same work.

The same web-like corpus (JSONL files of story pages, 30% of them planted near-duplicates: edited, reordered or
wrapped in boilerplate; llmkit.data.planted), the same work on both sides: MinHash near-dedup with the same
shingles, bands and rows, then tokenization with the same tokenizer. datatrove runs its four MinHash stages
(signatures, buckets, clusters, filter) and its DocumentTokenizer, each on a LocalPipelineExecutor; llmkit runs
`llmkit data-prep` (its cleaning and exact dedup come on top, and it packs blocks and writes a manifest). Each side
runs in its own process; the bench prints wall time, documents per second, peak resident memory of that process
(the executors run in it with one worker), the near-duplicates each removed, and the ratio.

`--scale K` then runs llmkit alone on K times as many files, to show the peak memory does not grow with the corpus.
`--generated N` instead runs llmkit alone on N and 10 N documents of the built-in corpus, generated on the fly (no
input on disk, one shard), and prints the peak memory of each.

    python bench/dataprep_vs_datatrove.py [--files 8] [--docs-per-file 2000] [--workers 1] [--scale 10]
    python bench/dataprep_vs_datatrove.py --generated 200000
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from _cli import scratch  # bench/_cli.py (run as python bench/NAME.py)

THRESHOLD, NGRAMS, NUM_PERM = 0.8, 5, 128


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--files", type=int, default=8)
    parser.add_argument("--docs-per-file", type=int, default=2000)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--scale", type=int, default=0, help="also run llmkit on this many times the files")
    parser.add_argument("--generated", type=int, default=0, help="built-in documents for the memory run")
    parser.add_argument("--side", choices=["llmkit", "datatrove", "generated"], help=argparse.SUPPRESS)
    parser.add_argument("--work", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.side:  # one side, in its own process: report its figures as JSON
        work = Path(args.work)
        files = sorted(str(p) for p in (work / "corpus").glob("*.jsonl"))[: args.files]
        start = time.perf_counter()
        if args.side == "generated":
            removed = run_generated(args.generated, work)
        else:
            removed = (run_llmkit if args.side == "llmkit" else run_datatrove)(files, work, args.workers)
        print(json.dumps({"seconds": time.perf_counter() - start, "removed": removed}))
        return

    work = scratch("llmkit-curate-bench-")
    if args.generated:
        for docs in (args.generated, 10 * args.generated):
            f = measure("generated", work, 0, 1, ["--generated", str(docs)])
            print(f"builtin:stories, {docs:,} documents generated on the fly: {f['seconds']:.1f}s, "
                  f"{docs / f['seconds']:,.0f} docs/s, peak RSS {f['peak_mib']:,.0f} MiB")  # fmt: skip
        return
    total_files = args.files * max(1, args.scale)
    docs = write_corpus(work, total_files, args.docs_per_file)
    corpus_bytes = sorted((work / "corpus").glob("*.jsonl"))
    size = sum(p.stat().st_size for p in corpus_bytes[: args.files])
    print(f"{args.files} files x {args.docs_per_file:,} documents ({size / 2**20:.1f} MiB), {args.workers} worker(s)")
    figures = {side: measure(side, work, args.files, args.workers) for side in ("datatrove", "llmkit")}
    for side, f in figures.items():
        print(
            f"  {side:9}  {f['seconds']:7.2f}s  {docs[args.files] / f['seconds']:>9,.0f} docs/s  "
            f"peak RSS {f['peak_mib']:,.0f} MiB  near-duplicates removed {f['removed']:,}"
        )
    ratio = figures["datatrove"]["seconds"] / figures["llmkit"]["seconds"]
    print(f"  ratio datatrove time / llmkit time: {ratio:.2f}x")
    if args.scale > 1:
        scaled = measure("llmkit", work, total_files, args.workers)
        big = sum(p.stat().st_size for p in corpus_bytes)
        print(
            f"llmkit on {args.scale}x: {total_files} files ({big / 2**20:,.0f} MiB): {scaled['seconds']:.1f}s, "
            f"peak RSS {scaled['peak_mib']:,.0f} MiB (1x: {figures['llmkit']['peak_mib']:,.0f} MiB)"
        )


def write_corpus(work: Path, files: int, per_file: int) -> dict[int, int]:
    """JSONL files of planted pages, each file its own corpus seed; returns documents in the first N files."""
    from llmkit.data.planted import planted_corpus

    (work / "corpus").mkdir(parents=True)
    counts, total = {}, 0
    for index in range(files):
        texts = planted_corpus(originals=round(per_file / 1.3), seed=index).texts
        lines = "".join(json.dumps({"text": text, "id": f"{index}-{i}"}) + "\n" for i, text in enumerate(texts))
        (work / "corpus" / f"part-{index:04d}.jsonl").write_text(lines, encoding="utf-8")
        total += len(texts)
        counts[index + 1] = total
    tokenizer_dir = work / "tokenizer"
    from llmkit.data.tokenizer import train_bpe

    train_bpe(iter(planted_corpus(originals=2000, seed=10_000).texts), 4096).save_pretrained(tokenizer_dir)
    return counts


def measure(side: str, work: Path, files: int, workers: int, extra: list[str] | None = None) -> dict[str, float]:
    command = [sys.executable, __file__, "--side", side, "--work", str(work), "--files", str(files), *(extra or [])]
    name = f"{side}-{files}-{'-'.join(extra or [])}"
    out, log = work / f"{name}.out", work / f"{name}.log"
    with out.open("w") as stdout, log.open("w") as stderr:
        process = subprocess.Popen([*command, "--workers", str(workers)], stdout=stdout, stderr=stderr)
        _, status, usage = os.wait4(process.pid, 0)
    if status != 0:
        sys.exit(f"{side} failed:\n{log.read_text()[-3000:]}")
    return {**json.loads(out.read_text().strip().splitlines()[-1]), "peak_mib": usage.ru_maxrss / 1024}


def run_llmkit(files: list[str], work: Path, workers: int) -> int:
    from llmkit.config import DataConfig
    from llmkit.data.prep import prepare_dataset

    cfg = DataConfig(
        sources=files, tokenizer=str(work / "tokenizer"), block_size=1024, val_fraction=0.0, workers=workers,
        near_dedup={"enabled": True, "threshold": THRESHOLD, "ngrams": NGRAMS, "num_perm": NUM_PERM},
    )  # fmt: skip
    out = work / f"llmkit-{len(files)}"
    result = prepare_dataset(cfg, out, overwrite=True)
    return result.manifest["documents"]["dropped"].get("near_duplicate", 0)


def run_generated(docs: int, work: Path) -> int:
    """The built-in corpus, generated while it is read: exact dedup, a tokenizer trained on 200k documents, packing."""
    from llmkit.config import DataConfig
    from llmkit.data.prep import prepare_dataset

    cfg = DataConfig(sources=["builtin:stories"], builtin_docs=docs, vocab_size=2048, block_size=1024)
    result = prepare_dataset(cfg, work / f"generated-{docs}", overwrite=True)
    return result.manifest["documents"]["dropped"].get("duplicate", 0)


def run_datatrove(files: list[str], work: Path, workers: int) -> int:
    from datatrove.executor import LocalPipelineExecutor
    from datatrove.pipeline.dedup.minhash import (
        MinhashDedupBuckets,
        MinhashDedupCluster,
        MinhashDedupFilter,
        MinhashDedupSignature,
    )
    from datatrove.pipeline.readers import JsonlReader
    from datatrove.pipeline.tokens import DocumentTokenizer

    from llmkit.config import NearDedupConfig
    from llmkit.data.curate import minhash_config, simplified_words

    mh = minhash_config(NearDedupConfig(enabled=True, threshold=THRESHOLD, ngrams=NGRAMS, num_perm=NUM_PERM))
    base = work / f"datatrove-{len(files)}"
    corpus = str(work / "corpus")
    names = [Path(f).name for f in files]
    paths = base / "paths.txt"
    base.mkdir(parents=True, exist_ok=True)
    paths.write_text("\n".join(names) + "\n")
    tasks = len(files)

    def reader() -> JsonlReader:
        return JsonlReader(corpus, paths_file=str(paths))

    def stage(pipeline: list, name: str, stage_tasks: int) -> None:
        executor = LocalPipelineExecutor(
            pipeline, tasks=stage_tasks, workers=min(workers, stage_tasks), logging_dir=str(base / "logs" / name)
        )
        executor.run()

    stage([reader(), MinhashDedupSignature(str(base / "sigs"), mh, language=simplified_words())], "sigs", tasks)
    stage([MinhashDedupBuckets(str(base / "sigs"), str(base / "buckets"), config=mh)], "buckets", mh.num_buckets)
    stage([MinhashDedupCluster(str(base / "buckets"), str(base / "remove"), config=mh)], "cluster", 1)
    tokenizer = str(work / "tokenizer" / "tokenizer.json")
    stage(
        [reader(), MinhashDedupFilter(str(base / "remove")),
         DocumentTokenizer(str(base / "tokens"), tokenizer, eos_token="<|endoftext|>", shuffle_documents=False)],
        "filter-tokenize", tasks,
    )  # fmt: skip
    removed = 0
    for path in (base / "remove").glob("*.remove"):
        removed += path.stat().st_size // 4
    return removed


if __name__ == "__main__":
    main()
