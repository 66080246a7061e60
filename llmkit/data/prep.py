"""`llmkit data-prep`: sources -> curated, deduplicated, tokenized, packed dataset with a manifest.

Curation (cleaning, filters, PII, decontamination, exact and near dedup) runs shard by shard in llmkit.data.curate,
into a work directory beside the output that survives an interruption. Then, in one process, the tokenizer is
trained on the kept training documents and every document is tokenized and packed, the training split in the
mixing order of `data.mix`. Memory is bounded by a batch per tokenizer worker and the curation's per-shard sorts,
never by the corpus size. Output is built in a staging directory and renamed into place at the end, so an
interrupted run leaves nothing that looks complete.
"""

from __future__ import annotations

import errno
import hashlib
import json
import math
import multiprocessing
import os
import shutil
import time
from collections import Counter, deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from itertools import chain
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from llmkit import __version__
from llmkit.atomic import atomic_directory, remove_stale_staging, write_json
from llmkit.config import DataConfig, input_paths
from llmkit.console import console, progress_bar
from llmkit.data import curate
from llmkit.data.corpus import BUILTIN_CORPORA, entropy_rate
from llmkit.data.decontaminate import Contamination, load_contamination
from llmkit.data.readers import Source, check_unchanged, refuse_shared_files, resolve_sources
from llmkit.data.store import FORMAT_VERSION, MANIFEST, SPLITS, ShardWriter, token_dtype
from llmkit.data.tokenizer import load_tokenizer, tokenizer_hash, train_bpe
from llmkit.errors import UserError
from llmkit.outputs import check_output, output_lock, replaces

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

BLOCKS_PER_SHARD_TARGET_BYTES = 256 * 2**20
# Memory per document is bounded: longer documents are tokenized in pieces of about this many characters
# (cut after a newline or a space), and a tokenizer batch holds about BATCH_CHARS characters at most.
PIECE_CHARS = 1 << 16
BATCH_CHARS = 1 << 20
TRAIN_PIECE_CHARS = 1 << 16  # the BPE trainer splits its whole input batch into words at once: feed it small pieces

# Settings that change the output; worker counts and batch sizes do not.
_FINGERPRINT_FIELDS = [
    "text_field",
    "encoding",
    "txt_mode",
    "tokenizer",
    "vocab_size",
    "block_size",
    "val_fraction",
    "normalize",
    "min_chars",
    "max_chars",
    "dedup",
    "builtin_docs",
    "seed",
    "tokenizer_train_docs",
    "quality",
    "pii",
    "decontaminate",
    "near_dedup",
    "mix",
]


@dataclass
class SplitStats:
    documents: int = 0
    chars: int = 0
    bits: float = 0.0  # exact information content, for built-in corpora


@dataclass
class PrepResult:
    path: Path
    manifest: dict[str, Any]
    reused: bool
    seconds: float = 0.0
    stats: dict[str, SplitStats] = field(default_factory=dict)
    shards_reused: int = 0  # curated by an earlier run that was interrupted


def prepare_dataset(
    cfg: DataConfig, out: str | Path, overwrite: bool = False, reads: Iterable[str | Path] = ()
) -> PrepResult:
    """Build (or reuse) the prepared dataset for `cfg` at `out`.

    `out` never swallows an input: it may not be a source file, a folder holding one, the tokenizer, a task file,
    anything in `reads` (the recipe), or the current directory; a folder of sources may hold it (llmkit outputs
    inside a source folder are skipped).
    """
    out = Path(out)
    groups = [resolve_sources([spec], skip=[out]) for spec in cfg.sources]
    refuse_shared_files(list(zip(cfg.sources, groups, strict=True)))
    sources = [source for group in groups for source in group]
    files = [s.name for s in sources if s.kind == "file"]
    check_output(out, [*files, *input_paths(cfg, skip=["dataset_dir", "sources"]), *reads])
    with output_lock(out):
        try:
            return _prepare(cfg, out, groups, overwrite)
        except OSError as exc:
            if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
                raise
            raise UserError(
                f"{out}: no space left on device while writing the dataset; nothing was kept (an earlier dataset "
                "there is unchanged); free space and run again"
            ) from None


def _prepare(cfg: DataConfig, out: Path, groups: list[list[Source]], overwrite: bool) -> PrepResult:
    sources = [source for group in groups for source in group]
    existing_tokenizer = load_tokenizer(cfg.tokenizer) if cfg.tokenizer else None
    contamination = load_contamination(cfg.decontaminate)
    fingerprint = _fingerprint(cfg, sources, existing_tokenizer, contamination)
    manifest_path = out / MANIFEST
    if manifest_path.is_file() and not overwrite:
        manifest = _read_manifest(manifest_path)
        if manifest.get("fingerprint") == fingerprint:
            return PrepResult(out, manifest, reused=True)
    else:
        replaces(out, overwrite)

    start = time.perf_counter()
    remove_stale_staging(out.parent, f".{out.name}.tmp-*")  # left by an interrupted run
    work = out.parent / f".{out.name}.work-{fingerprint[:16]}"  # kept across an interruption: finished shards stay
    for stale in out.parent.glob(f".{out.name}.work-*"):
        if stale != work:
            shutil.rmtree(stale, ignore_errors=True)
    try:
        manifest, result, reused = _build(cfg, out, groups, existing_tokenizer, contamination, fingerprint, work)
    except Exception:
        shutil.rmtree(work, ignore_errors=True)  # an error needs changed input or settings: the work is stale
        raise
    shutil.rmtree(work, ignore_errors=True)
    seconds = time.perf_counter() - start
    return PrepResult(out, manifest, reused=False, seconds=seconds, stats=result["stats"], shards_reused=reused)


def _build(
    cfg: DataConfig,
    out: Path,
    groups: list[list[Source]],
    existing_tokenizer: Any,
    contamination: Contamination | None,
    fingerprint: str,
    work: Path,
) -> tuple[dict[str, Any], dict[str, Any], int]:
    """Curate into `work` (kept if interrupted), then tokenize and pack into a staging directory renamed to `out`."""
    sources = [source for group in groups for source in group]
    with atomic_directory(out) as staging:
        with console.status(f"curating {len(sources)} shard(s) on {min(cfg.workers, len(sources))} process(es)"):
            try:
                reused = curate.curate_shards(cfg, sources, work, contamination)
            except FileNotFoundError:
                check_unchanged(sources)  # names a source deleted since it was found
                raise
            corpus = curate.CuratedCorpus(cfg, work, groups)
        if corpus.kept == 0:
            raise UserError(_nothing_left(corpus.dropped))
        if existing_tokenizer is not None:
            tokenizer, tokenizer_source = existing_tokenizer, cfg.tokenizer
        else:
            tokenizer, tokenizer_source = _train_tokenizer(cfg, corpus), "trained"
        tokenizer.save_pretrained(staging / "tokenizer")
        result = _tokenize_and_pack(cfg, corpus, tokenizer, staging)
        check_unchanged(sources)
        manifest = _manifest(cfg, sources, tokenizer, str(tokenizer_source), fingerprint, result)
        write_json(staging / MANIFEST, manifest)
        if corpus.contaminated:
            lines = "".join(json.dumps(entry, ensure_ascii=False) + "\n" for entry in corpus.contaminated)
            (staging / "audit.jsonl").write_text(lines, encoding="utf-8")
    return manifest, result, reused


def _read_manifest(path: Path) -> dict[str, Any]:
    """An existing output's manifest; one that cannot be read is a broken output, rebuilt only on --overwrite."""
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError):
        raise UserError(f"{path}: unreadable dataset manifest; pass --overwrite to rebuild the dataset") from None
    return manifest if isinstance(manifest, dict) else {}


def _settings(cfg: DataConfig) -> dict[str, Any]:
    return cfg.model_dump(include=set(_FINGERPRINT_FIELDS))


def _fingerprint(
    cfg: DataConfig,
    sources: list[Source],
    tokenizer: PreTrainedTokenizerBase | None,
    contamination: Contamination | None,
) -> str:
    spec = {
        "format_version": FORMAT_VERSION,
        "sources": [source.describe() for source in sources],
        "settings": _settings(cfg),
        "evaluation_items": contamination.digest() if contamination is not None else None,
        "tokenizer_hash": tokenizer_hash(tokenizer) if tokenizer is not None else None,
        "builtin_grammars": {
            s.name: hashlib.sha256(repr(BUILTIN_CORPORA[s.name]).encode()).hexdigest()
            for s in sources
            if s.kind == "builtin"
        },
    }
    if cfg.near_dedup.enabled:  # bands for recall and a check of every candidate (before: bands split at threshold)
        spec["near_dedup_method"] = "recall-bands+true-jaccard"
    return hashlib.sha256(json.dumps(spec, sort_keys=True, default=str).encode()).hexdigest()


def _train_tokenizer(cfg: DataConfig, corpus: curate.CuratedCorpus) -> Any:
    """Train a byte-level BPE on the kept training documents (the validation split stays unseen)."""
    limit = cfg.tokenizer_train_docs

    def texts() -> Iterator[str]:
        for used, doc in enumerate(corpus.documents("train")):
            if limit is not None and used >= limit:
                return
            yield from (piece for piece, _ in split_long(doc.text, TRAIN_PIECE_CHARS))

    with console.status(f"training a byte-level BPE tokenizer (vocab {cfg.vocab_size})"):
        return train_bpe(texts(), cfg.vocab_size)


def _tokenize_and_pack(
    cfg: DataConfig, corpus: curate.CuratedCorpus, tokenizer: PreTrainedTokenizerBase, staging: Path
) -> dict[str, Any]:
    dtype = token_dtype(len(tokenizer))
    blocks_per_shard = max(1, BLOCKS_PER_SHARD_TARGET_BYTES // (cfg.block_size * dtype.itemsize))
    writers = {split: ShardWriter(staging / split, cfg.block_size, dtype, blocks_per_shard) for split in SPLITS}
    stats = {split: SplitStats() for split in SPLITS}
    tokenizer_file = staging / "tokenizer" / "tokenizer.json"

    def batches() -> Iterator[tuple[str, Batch]]:
        pending = {split: Batch() for split in SPLITS}
        for doc in chain(corpus.mixed_training(), corpus.documents("val")):
            split_stats = stats[doc.split]
            split_stats.documents += 1
            split_stats.chars += len(doc.text)
            split_stats.bits += doc.bits or 0.0
            batch = pending[doc.split]
            for piece, last in split_long(doc.text):
                batch.add(piece, ends_document=last)
                if batch.documents >= cfg.batch_docs or batch.chars >= BATCH_CHARS:
                    yield doc.split, batch
                    batch = pending[doc.split] = Batch()
        for split in SPLITS:
            if pending[split].texts:
                yield split, pending[split]

    processes = min(cfg.workers, os.cpu_count() or 1)  # a Ray cluster's workers are not this machine's cores
    start = time.perf_counter()
    docs_done = tokens_done = 0
    with progress_bar(f"tokenizing on {processes} process(es)", corpus.packed_documents, unit="docs") as update:
        for split, count, tokens in _encode_stream(batches(), tokenizer, tokenizer_file, processes):
            writers[split].add(tokens)
            docs_done += count
            tokens_done += len(tokens)
            elapsed = max(time.perf_counter() - start, 1e-9)
            update(count, f"{docs_done / elapsed:,.0f} docs/s {tokens_done / elapsed:,.0f} tok/s")

    if writers["train"].blocks == 0:
        raise UserError(
            f"only {writers['train'].tokens} training tokens after cleaning, fewer than one block of "
            f"{cfg.block_size}; lower data.block_size or add data"
        )
    return {"writers": writers, "stats": stats, "corpus": corpus, "dtype": dtype}


@dataclass
class Batch:
    """Texts to tokenize together: whole documents, or pieces of a long one (EOS only after its last piece)."""

    texts: list[str] = field(default_factory=list)
    ends: list[bool] = field(default_factory=list)
    chars: int = 0
    documents: int = 0

    def add(self, text: str, ends_document: bool) -> None:
        self.texts.append(text)
        self.ends.append(ends_document)
        self.chars += len(text)
        self.documents += ends_document


def split_long(text: str, limit: int = PIECE_CHARS) -> Iterator[tuple[str, bool]]:
    """`text` in pieces of at most about `limit` characters, each with whether it is the last, cut after a newline
    (else a space) when there is one in the second half of the piece, so tokenizing needs memory for a few pieces,
    not the document."""
    start = 0
    while len(text) - start > limit:
        end = start + limit
        cut = text.rfind("\n", start + limit // 2, end)
        if cut < 0:
            cut = text.rfind(" ", start + limit // 2, end)
        end = cut + 1 if cut >= 0 else end
        yield text[start:end], False
        start = end
    yield text[start:], True


def _encode_stream(
    batches: Iterator[tuple[str, Batch]], tokenizer: PreTrainedTokenizerBase, tokenizer_file: Path, processes: int
) -> Iterator[tuple[str, int, np.ndarray]]:
    """Tokenize batches in order: in this process, or in `processes` workers with a bounded queue."""
    eos = int(tokenizer.eos_token_id)
    if processes <= 1:
        backend = tokenizer.backend_tokenizer
        for split, batch in batches:
            yield split, batch.documents, encode_batch(backend, batch.texts, eos, batch.ends)
        return
    context = multiprocessing.get_context("spawn")
    with context.Pool(processes, initializer=_init_worker, initargs=(str(tokenizer_file), eos)) as pool:
        window: deque[tuple[str, int, Any]] = deque()
        for split, batch in batches:
            job = pool.apply_async(_encode_in_worker, (batch.texts, batch.ends))
            window.append((split, batch.documents, job))
            if len(window) >= 2 * processes:
                first_split, count, job = window.popleft()
                yield first_split, count, job.get()
        while window:
            first_split, count, job = window.popleft()
            yield first_split, count, job.get()


def encode_batch(backend: Any, texts: list[str], eos: int, ends: list[bool] | None = None) -> np.ndarray:
    """Token ids of `texts`, each followed by EOS (or, with `ends`, only those that end a document), as one
    flat array (the packing stream)."""
    encodings = backend.encode_batch_fast(texts, add_special_tokens=False)
    ends = ends if ends is not None else [True] * len(texts)
    total = sum(len(encoding.ids) for encoding in encodings) + sum(ends)
    stream = chain.from_iterable(
        chain(encoding.ids, (eos,) if end else ()) for encoding, end in zip(encodings, ends, strict=True)
    )
    return np.fromiter(stream, dtype=np.uint32, count=total)


_worker: dict[str, Any] = {}


def _init_worker(tokenizer_file: str, eos: int) -> None:
    from tokenizers import Tokenizer

    _worker["backend"] = Tokenizer.from_file(tokenizer_file)
    _worker["eos"] = eos


def _encode_in_worker(texts: list[str], ends: list[bool]) -> np.ndarray:
    return encode_batch(_worker["backend"], texts, _worker["eos"], ends)


def _nothing_left(dropped: Counter[str]) -> str:
    reasons = ", ".join(f"{n} {reason}" for reason, n in sorted(dropped.items())) or "no documents read"
    return f"nothing left after filtering ({reasons}); check the data.* filters and the text field"


def _manifest(
    cfg: DataConfig,
    sources: list[Source],
    tokenizer: PreTrainedTokenizerBase,
    tokenizer_source: str,
    fingerprint: str,
    result: Any,
) -> dict[str, Any]:
    writers: dict[str, ShardWriter] = result["writers"]
    stats: dict[str, SplitStats] = result["stats"]
    corpus: curate.CuratedCorpus = result["corpus"]
    splits = {
        split: {
            "documents": stats[split].documents,
            "chars": stats[split].chars,
            "tokens": writers[split].tokens,
            "blocks": writers[split].blocks,
            "remainder_tokens": writers[split].remainder,
            "shards": writers[split].shards,
        }
        for split in SPLITS
    }
    return {
        "format_version": FORMAT_VERSION,
        "llmkit_version": __version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "fingerprint": fingerprint,
        "sources": [source.describe() for source in sources],
        "settings": _settings(cfg),
        "tokenizer": {
            "source": tokenizer_source,
            "hash": tokenizer_hash(tokenizer),
            "vocab_size": len(tokenizer),
            "eos_token_id": tokenizer.eos_token_id,
            "pad_token_id": tokenizer.pad_token_id,
        },
        "block_size": cfg.block_size,
        "dtype": result["dtype"].name,
        "documents": {
            "kept": corpus.kept,
            "dropped": dict(sorted(corpus.dropped.items())),
            "read": corpus.read,
            "changed": dict(sorted(corpus.changed.items())),
        },
        "curation": corpus.report(),
        "mix": corpus.mix,
        "splits": splits,
        "entropy": _entropy_floor(sources, stats),
    }


def _entropy_floor(sources: list[Source], stats: dict[str, SplitStats]) -> dict[str, Any] | None:
    """For a corpus made only of one built-in grammar: its exact entropy rate and each split's floor."""
    names = {source.name for source in sources if source.kind == "builtin"}
    if len(names) != 1 or len(names) != len(sources):
        return None
    name = names.pop()
    rate = entropy_rate(BUILTIN_CORPORA[name])
    floor = {split: (stats[split].bits / stats[split].chars if stats[split].chars else math.nan) for split in SPLITS}
    return {
        "corpus": f"builtin:{name}",
        "bits_per_char_expected": rate.bits_per_char,
        "bits_per_char": {split: value for split, value in floor.items() if not math.isnan(value)},
    }
