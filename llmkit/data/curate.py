"""Curation: the per-shard work of data-prep, and the deduplication across shards that follows it.

1. One task per shard (an input file, a hub dataset or a built-in corpus), run by datatrove's executor on
   `data.workers` processes: read, clean, filter, mask PII, decontaminate; write the kept documents, their exact
   digests (sorted, for a merge) and, with near-dedup on, their MinHash signatures (datatrove's step).
2. Near-dedup only: datatrove's LSH buckets, one task per band, write candidate duplicate pairs.
3. Here, in one process: exact duplicates from a merge of the sorted digests, near-duplicate pairs, grouped with a
   union-find; in each group the earliest document (shard, then position) is kept, as exact dedup always did.

A task's outputs depend only on its shard, and step 3 only on document positions, so any number of workers writes
the same bytes. The work directory keeps finished tasks (datatrove marks each complete), so a run that was
interrupted resumes without redoing them. Memory: digests are sorted in runs of a million; datatrove sorts a
shard's signatures one band at a time (about 120 bytes per document of the largest shard, near-dedup only); an
exact copy costs 8 bytes (its position); the union-find holds only pages with a near-duplicate.
"""

from __future__ import annotations

import contextlib
import hashlib
import heapq
import json
import math
import os
import struct
import sys
from array import array
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from llmkit.config import DataConfig, NearDedupConfig
from llmkit.data import quality
from llmkit.data.cleaning import clean_text, is_validation
from llmkit.data.decontaminate import Contamination
from llmkit.data.readers import Source, read_documents
from llmkit.errors import UserError

DIGEST = np.dtype([("hi", ">u8"), ("lo", ">u8"), ("doc", "<u4")])  # big-endian halves sort as the bytes do
RUN_DOCS = 1 << 20  # digests sorted in memory at once (16 MiB), then written as one sorted run
SAMPLE_PAIRS = 10
EXCERPT_CHARS = 160


@dataclass
class ShardStats:
    """What one shard's task read, dropped and changed."""

    read: int = 0
    kept: int = 0
    dropped: Counter[str] = field(default_factory=Counter)
    changed: Counter[str] = field(default_factory=Counter)  # pii masks, c4 lines removed
    contaminated: list[dict[str, str]] = field(default_factory=list)


class CurateShard:
    """The per-shard task: a datatrove pipeline step (callable with the task's rank) yielding the kept documents."""

    def __init__(self, cfg: DataConfig, shards: list[Source], work: Path, contamination: Contamination | None):
        self.cfg, self.shards, self.work, self.contamination = cfg, shards, work, contamination
        q = cfg.quality
        self.language = quality.LanguageFilter(q.languages, q.language_threshold) if q.languages else None

    def __call__(self, data: Any, rank: int = 0, world_size: int = 1) -> Iterator[Any]:
        from datatrove.data import Document

        cfg, stats = self.cfg, ShardStats()
        with ShardOutput(self.work, rank, cfg) as output:
            for raw in read_documents(
                self.shards[rank], cfg.text_field, cfg.txt_mode, cfg.builtin_docs, cfg.seed, cfg.encoding
            ):
                stats.read += 1
                text = self._curate(clean_text(raw.text, cfg.normalize), raw.origin, stats)
                if text is not None:
                    yield Document(text=text, id=str(output.add(text, raw.origin, raw.bits)))
        stats.kept = output.kept
        _write_bytes(self.work / "shards" / f"{rank:05d}.json", json.dumps(stats.__dict__).encode())

    def _curate(self, text: str, origin: str, stats: ShardStats) -> str | None:
        """The document after every per-document rule, or None (its reason counted) when one drops it."""
        cfg, q = self.cfg, self.cfg.quality
        reason = _length(text, cfg)
        if reason is None and self.language is not None:
            reason = self.language(text)
        if reason is None and q.gopher_repetition:
            reason = quality.gopher_repetition(text, q)
        if reason is None and q.gopher_quality:
            reason = quality.gopher_quality(text, q)
        if reason is None and q.c4:
            text, removed, reason = quality.c4_lines(text, q)
            stats.changed["c4_lines_removed"] += removed
        if reason is None and self.contamination is not None:
            item = self.contamination.find(text)
            if item is not None:
                stats.contaminated.append({"doc": origin, "item": item, "action": cfg.decontaminate.action})
                reason = "contaminated" if cfg.decontaminate.action == "drop" else None
        if reason is None and cfg.pii:
            text, masked = quality.mask_pii(text)
            stats.changed.update(masked)
        if reason is None and not text:  # C4 removed every line
            reason = "empty"
        if reason is not None:
            stats.dropped[reason] += 1
            return None
        return text


class ShardOutput:
    """A shard's kept documents on disk: the records, their exact digests in sorted runs, and their splits."""

    def __init__(self, work: Path, rank: int, cfg: DataConfig) -> None:
        self.work, self.rank, self.cfg = work, rank, cfg
        self.kept = 0
        self.digests = bytearray()
        self.splits = bytearray()
        path = work / "docs" / f"{rank:05d}.bin"
        path.parent.mkdir(parents=True, exist_ok=True)
        self.records = path.open("wb")

    def add(self, text: str, origin: str, bits: float | None) -> int:
        """Write one document; returns its position in the shard."""
        encoded, origin_bytes = text.encode("utf-8"), origin.encode("utf-8")
        self.records.write(_RECORD.pack(len(encoded), len(origin_bytes), math.nan if bits is None else bits))
        self.records.write(encoded + origin_bytes)
        self.splits.append(is_validation(text, self.cfg.val_fraction, self.cfg.seed))
        self.digests += hashlib.blake2b(encoded, digest_size=16).digest()
        self.kept += 1
        if len(self.digests) == 16 * RUN_DOCS:  # a sorted run on disk: memory stays bounded on any shard
            self._write_run()
        return self.kept - 1

    def _write_run(self) -> None:
        count = len(self.digests) // 16
        first = self.kept - count
        path = self.work / "digests" / f"{self.rank:05d}-{first // RUN_DOCS:05d}.bin"
        halves = np.frombuffer(bytes(self.digests), dtype=">u8").reshape(-1, 2)
        records = np.empty(count, dtype=DIGEST)
        records["hi"], records["lo"], records["doc"] = halves[:, 0], halves[:, 1], np.arange(first, self.kept)
        records.sort(order=["hi", "lo", "doc"], kind="stable")
        _write_bytes(path, records.tobytes())
        self.digests = bytearray()

    def __enter__(self) -> ShardOutput:
        return self

    def __exit__(self, *exc: object) -> None:
        self.records.close()
        self._write_run()
        _write_bytes(self.work / "splits" / f"{self.rank:05d}.bin", bytes(self.splits))


def _length(text: str, cfg: DataConfig) -> str | None:
    if not text:
        return "empty"
    if len(text) < cfg.min_chars:
        return "too_short"
    if cfg.max_chars is not None and len(text) > cfg.max_chars:
        return "too_long"
    return None


def _write_bytes(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


# --- running the tasks ----------------------------------------------------------------------------------------


LSH_RECALL = 0.99  # of pairs 0.05 above the threshold, by the bands alone


def lsh_bands(threshold: float, num_perm: int) -> tuple[int, int]:
    """Bands and rows per band (bands x rows <= num_perm), chosen for recall: the most rows (the fewest dissimilar
    candidates) whose S-curve 1 - (1 - s^rows)^bands still makes candidates of LSH_RECALL of the pairs 0.05 above
    the threshold (halfway to 1 above 0.9). Candidates are then kept or dropped on their true similarity
    (`Similarity`), so precision does not rest on the curve: a curve split at the threshold missed half the pairs
    just above it."""
    target = min(threshold + 0.05, (1 + threshold) / 2)
    for rows in range(num_perm, 0, -1):
        bands = num_perm // rows
        if 1 - (1 - target**rows) ** bands >= LSH_RECALL:
            return bands, rows
    return num_perm, 1


def minhash_config(cfg: NearDedupConfig) -> Any:
    from datatrove.pipeline.dedup.minhash import MinhashConfig
    from datatrove.utils.hashing import HashConfig

    bands, rows = lsh_bands(cfg.threshold, cfg.num_perm)
    # sha1 (standard library): datatrove's default xxhash path fails with xxhash 4, which hashes bytes only
    shingles = HashConfig(precision=64, hash_fc="sha1")
    return MinhashConfig(cfg.ngrams, bands, rows, cfg.seed, hash_config=shingles)


def simplified_words() -> Any:
    """datatrove's MinHash shingles the words of text it has already simplified (lower case, no punctuation), so a
    split on whitespace is all they need; its default English tokenizer would pull in spaCy. datatrove takes a
    custom tokenizer as a WordTokenizer in place of the language."""
    from datatrove.utils.word_tokenizers import WordTokenizer

    class SimplifiedWords(WordTokenizer):
        def word_tokenize(self, text: str) -> list[str]:
            return text.split()

        def sent_tokenize(self, text: str) -> list[str]:
            return [text]

        def span_tokenize(self, text: str) -> list[tuple[int, int]]:
            return [(0, len(text))]

    return SimplifiedWords()


def run_tasks(pipeline: list[Any], tasks: int, cfg: DataConfig, logs: Path) -> int:
    """Run `tasks` ranks of a datatrove pipeline on local processes or Ray; returns how many were already done.

    datatrove logs every task to `logs` (and to stderr, which is pointed at logs/stderr.log meanwhile, so a
    terminal sees llmkit's lines only). A task that failed raises its error here; finished tasks stay marked.
    """
    done = len(list((logs / "completions").glob("*"))) if (logs / "completions").is_dir() else 0
    logs.mkdir(parents=True, exist_ok=True)
    with _stderr_to(logs / "stderr.log"), _children_die_with_us():
        _executor(pipeline, tasks, cfg, logs).run()
    return done


_FORKING = {"active": False, "parent": 0}


def _record_parent() -> None:
    _FORKING["parent"] = os.getpid()


def _die_with_parent() -> None:
    """In a child forked while `_children_die_with_us` is active: be killed when the forking process dies, even by
    SIGKILL (Linux's parent-death signal). datatrove's Manager is such a child: left alive, it also holds the pipes
    that would end the fork server and the resource tracker, so all three outlived a killed data-prep."""
    if not _FORKING["active"] or not sys.platform.startswith("linux"):
        return
    import ctypes
    import signal

    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    if os.getppid() != _FORKING["parent"]:  # the parent died before the line above
        os._exit(1)


os.register_at_fork(before=_record_parent, after_in_child=_die_with_parent)


@contextlib.contextmanager
def _children_die_with_us() -> Iterator[None]:
    _FORKING["active"] = True
    try:
        yield
    finally:
        _FORKING["active"] = False


def _executor(pipeline: list[Any], tasks: int, cfg: DataConfig, logs: Path) -> Any:
    if cfg.executor == "ray":
        from datatrove.executor import RayPipelineExecutor

        return RayPipelineExecutor(pipeline, tasks=tasks, workers=cfg.workers, logging_dir=str(logs), mem_per_cpu_gb=1)
    from datatrove.executor import LocalPipelineExecutor

    return LocalPipelineExecutor(pipeline, tasks=tasks, workers=min(cfg.workers, tasks), logging_dir=str(logs))


@contextlib.contextmanager
def _stderr_to(path: Path) -> Iterator[None]:
    """Point stderr (the file descriptor, which worker processes inherit, and sys.stderr) at `path`."""
    sys.stderr.flush()
    saved, saved_stream = os.dup(2), sys.stderr
    with path.open("a", encoding="utf-8") as log:
        os.dup2(log.fileno(), 2)
        sys.stderr = log
        try:
            yield
        finally:
            sys.stderr = saved_stream
            os.dup2(saved, 2)
            os.close(saved)


@contextlib.contextmanager
def _engine(cfg: DataConfig) -> Iterator[None]:
    """Connected to Ray for the curation when asked (a local instance started here is stopped after)."""
    if cfg.executor != "ray":
        yield
        return
    try:
        import ray
    except ImportError:
        raise UserError("data.executor=ray needs Ray: pip install 'llmkit[ray]'") from None
    started = not ray.is_initialized()
    if started:
        ray.init(address=cfg.ray_address, log_to_driver=False, include_dashboard=False)
    try:
        yield
    finally:
        if started:
            ray.shutdown()


def curate_shards(cfg: DataConfig, shards: list[Source], work: Path, contamination: Contamination | None) -> int:
    """Steps 1 and 2: every shard's task, then the LSH buckets; returns how many shard tasks an earlier run did."""
    with _engine(cfg):
        return _curate_shards(cfg, shards, work, contamination)


def _curate_shards(cfg: DataConfig, shards: list[Source], work: Path, contamination: Contamination | None) -> int:
    step: list[Any] = [CurateShard(cfg, shards, work, contamination)]
    if cfg.near_dedup.enabled:
        from datatrove.pipeline.dedup.minhash import MinhashDedupSignature

        sigs = str(work / "minhash" / "sigs")
        step.append(MinhashDedupSignature(sigs, minhash_config(cfg.near_dedup), language=simplified_words()))
    reused = run_tasks(step, len(shards), cfg, work / "logs" / "shards")
    if cfg.near_dedup.enabled:
        from datatrove.pipeline.dedup.minhash import MinhashDedupBuckets

        mh = minhash_config(cfg.near_dedup)
        buckets = MinhashDedupBuckets(
            input_folder=str(work / "minhash" / "sigs"), output_folder=str(work / "minhash" / "buckets"), config=mh
        )
        run_tasks([buckets], mh.num_buckets, cfg, work / "logs" / "buckets")
    return reused


# --- step 3: which documents are duplicates --------------------------------------------------------------------


@dataclass
class Duplicates:
    """Per shard, the positions of removed documents; counts by reason; a sample of near-duplicate pairs."""

    removed: dict[int, np.ndarray]
    counts: Counter[str]
    sample: list[tuple[tuple[int, int], tuple[int, int]]]  # (removed, kept), as (shard, position)
    candidates: Counter[str] = field(default_factory=Counter)  # near-dedup candidate pairs: checked, below threshold


def find_duplicates(work: Path, shards: int, exact: bool, near: NearDedupConfig | None) -> Duplicates:
    """Exact copies straight from the digest merge (only their positions are held); near-duplicate pairs grouped
    with a union-find over the pages that have one, an exact copy standing for the first page of its text."""
    removed: dict[int, array[int]] = {}
    counts: Counter[str] = Counter()
    first_of: dict[tuple[int, int], tuple[int, int]] = {}  # exact copy -> first page with its text (near-dedup only)
    if exact:
        previous: tuple[bytes, tuple[int, int]] | None = None
        for digest, node in heapq.merge(*(_digests(work, shard) for shard in range(shards))):
            if previous is not None and previous[0] == digest:
                removed.setdefault(node[0], array("q")).append(node[1])
                counts["duplicate"] += 1
                if near:
                    first_of[node] = previous[1]
            else:
                previous = (digest, node)
    sample: list[tuple[tuple[int, int], tuple[int, int]]] = []
    candidates: Counter[str] = Counter()
    if near:
        parent = _near_groups(work, first_of, Similarity(work, near), candidates)
        for node in sorted(parent):
            kept = _root(parent, node)
            if kept != node:
                removed.setdefault(node[0], array("q")).append(node[1])
                counts["near_duplicate"] += 1
                if len(sample) < SAMPLE_PAIRS:
                    sample.append((node, kept))
    positions = {shard: np.sort(np.frombuffer(docs, dtype=np.int64)) for shard, docs in removed.items()}
    return Duplicates(positions, counts, sample, candidates)


RUN_GROUPS = 32  # groups a document in one LSH bucket is compared with (the bucket's earliest member of each)


def _near_groups(
    work: Path, first_of: dict[tuple[int, int], tuple[int, int]], similarity: Similarity, candidates: Counter[str]
) -> dict[tuple[int, int], Any]:
    """Union-find over the documents that share an LSH bucket and whose true similarity reaches the threshold: each
    group's root is its earliest page.

    datatrove writes a bucket's members as a chain of pairs (a, b), (b, c), ...; with every pair checked, a chain
    through one dissimilar member would hide a and c from each other, so each bucket's run is read whole and every
    member compared with the earliest member of each group met in that run (at most RUN_GROUPS)."""
    parent: dict[tuple[int, int], tuple[int, int]] = {}
    checked: set[tuple[tuple[int, int], tuple[int, int]]] = set()
    for path in sorted((work / "minhash" / "buckets").glob("*.dups")):
        for run in _bucket_runs(path):
            firsts: dict[tuple[int, int], tuple[int, int]] = {}  # group root -> its earliest member in this run
            for node in dict.fromkeys(first_of.get(member, member) for member in run):
                for other in list(firsts.values())[:RUN_GROUPS]:
                    a, b = min(node, other), max(node, other)
                    ra, rb = _root(parent, a), _root(parent, b)
                    if ra == rb or (a, b) in checked:
                        continue
                    checked.add((a, b))
                    if similarity(a, b) < similarity.threshold:
                        candidates["below_threshold"] += 1
                        continue
                    parent[max(ra, rb)] = min(ra, rb)
                    parent.setdefault(min(ra, rb), min(ra, rb))
                firsts.setdefault(_root(parent, node), node)
    candidates["checked"] = len(checked)
    return parent


def _bucket_runs(path: Path) -> Iterator[list[tuple[int, int]]]:
    """The runs of one bucket file: the documents sharing one band's hash, from datatrove's chain of pairs ((shard,
    position) twice, as uint32)."""
    run: list[tuple[int, int]] = []
    for f1, d1, f2, d2 in np.fromfile(path, dtype="<u4").reshape(-1, 4).tolist():
        if run and run[-1] == (f1, d1):
            run.append((f2, d2))
            continue
        if run:
            yield run
        run = [(f1, d1), (f2, d2)]
    if run:
        yield run


class Shingles:
    """A text's set of hashed word n-grams, made by the same datatrove code that makes its MinHash signature."""

    def __init__(self, cfg: NearDedupConfig, scratch: Path) -> None:
        from datatrove.pipeline.dedup.minhash import MinhashDedupSignature

        self.signature = MinhashDedupSignature(str(scratch), minhash_config(cfg), language=simplified_words())

    def __call__(self, text: str) -> np.ndarray:
        return np.unique(self.signature.get_shingles(text))


def jaccard(first: np.ndarray, second: np.ndarray) -> float:
    """|A & B| / |A | B| of two sets of shingles (sorted, unique)."""
    union = len(np.union1d(first, second))
    return len(np.intersect1d(first, second, assume_unique=True)) / union if union else 0.0


SHINGLES_KEPT = 4096


class Similarity:
    """The true Jaccard similarity of two curated documents. Texts are read from the curated shards on disk (an
    offset per document of a shard that has a candidate), so memory grows with the candidates' shards, not with
    the corpus's text; the last SHINGLES_KEPT documents' shingles are kept (a document meets its group in many
    bands)."""

    def __init__(self, work: Path, cfg: NearDedupConfig) -> None:
        self.work, self.threshold = work, cfg.threshold
        self.shingles = Shingles(cfg, work / "minhash" / "sigs")
        self.offsets: dict[int, np.ndarray] = {}
        self.recent: dict[tuple[int, int], np.ndarray] = {}

    def __call__(self, a: tuple[int, int], b: tuple[int, int]) -> float:
        return jaccard(self.of(a), self.of(b))

    def of(self, node: tuple[int, int]) -> np.ndarray:
        if node not in self.recent:
            if len(self.recent) >= SHINGLES_KEPT:
                del self.recent[next(iter(self.recent))]
            self.recent[node] = self.shingles(self.text(node))
        return self.recent[node]

    def text(self, node: tuple[int, int]) -> str:
        shard, position = node
        path = self.work / "docs" / f"{shard:05d}.bin"
        if shard not in self.offsets:
            self.offsets[shard] = _record_offsets(path)
        with path.open("rb") as records:
            records.seek(int(self.offsets[shard][position]))
            text_bytes, _, _ = _RECORD.unpack(records.read(_RECORD.size))
            return records.read(text_bytes).decode("utf-8")


def _record_offsets(path: Path) -> np.ndarray:
    offsets = array("q")
    with path.open("rb") as records:
        while header := records.read(_RECORD.size):
            offsets.append(records.tell() - _RECORD.size)
            text_bytes, origin_bytes, _ = _RECORD.unpack(header)
            records.seek(text_bytes + origin_bytes, os.SEEK_CUR)
    return np.frombuffer(offsets, dtype=np.int64)


def _root(parent: dict[tuple[int, int], tuple[int, int]], node: tuple[int, int]) -> tuple[int, int]:
    while parent.get(node, node) != node:
        parent[node] = parent.get(parent[node], parent[node])  # path halving
        node = parent[node]
    return node


def _digests(work: Path, shard: int) -> Iterator[tuple[bytes, tuple[int, int]]]:
    """A shard's digests in order, merged from its sorted runs."""
    runs = sorted((work / "digests").glob(f"{shard:05d}-*.bin"))
    return heapq.merge(*(_run(path, shard) for path in runs))


def _run(path: Path, shard: int) -> Iterator[tuple[bytes, tuple[int, int]]]:
    records = np.memmap(path, dtype=DIGEST, mode="r") if path.stat().st_size else np.empty(0, dtype=DIGEST)
    for start in range(0, len(records), 1 << 16):
        chunk = records[start : start + (1 << 16)]
        keys = np.stack([chunk["hi"], chunk["lo"]], axis=1).astype(">u8").tobytes()
        for i, doc in enumerate(chunk["doc"].tolist()):
            yield keys[16 * i : 16 * i + 16], (shard, doc)


def shard_stats(work: Path, shard: int) -> dict[str, Any]:
    return json.loads((work / "shards" / f"{shard:05d}.json").read_text(encoding="utf-8"))


def shard_splits(work: Path, shard: int) -> np.ndarray:
    return np.frombuffer((work / "splits" / f"{shard:05d}.bin").read_bytes(), dtype=np.uint8)


# A curated document on disk: text and origin lengths in bytes, the exact bits (NaN: unknown), text, origin.
_RECORD = struct.Struct("<IId")


@dataclass(frozen=True)
class Record:
    text: str
    origin: str
    bits: float | None


def shard_documents(work: Path, shard: int, keep: np.ndarray | None = None) -> Iterator[tuple[int, Record]]:
    """The curated documents of a shard with their positions; with `keep` (a flag per position), only those it
    flags (the others are skipped unread)."""
    flags = keep.tolist() if keep is not None else None
    with (work / "docs" / f"{shard:05d}.bin").open("rb") as records:
        position = 0
        while header := records.read(_RECORD.size):
            text_bytes, origin_bytes, bits = _RECORD.unpack(header)
            if flags is not None and not flags[position]:
                records.seek(text_bytes + origin_bytes, os.SEEK_CUR)
            else:
                text = records.read(text_bytes).decode("utf-8")
                origin = records.read(origin_bytes).decode("utf-8")
                yield position, Record(text, origin, None if math.isnan(bits) else bits)
            position += 1


def excerpt(text: str) -> str:
    return text if len(text) <= EXCERPT_CHARS else text[:EXCERPT_CHARS] + "..."


# --- the curated corpus, read back ------------------------------------------------------------------------------


@dataclass(frozen=True)
class CleanDocument:
    text: str
    split: str
    bits: float | None


class CuratedCorpus:
    """The curated shards read back, duplicates left out: per split, and the training split in mixing order.

    `data.mix` weighs each source (as written in data.sources) in epochs: its training documents are repeated
    int(weight) times, then every document i with floor((i + 1) f) > floor(i f) for the fraction f, exactly
    int(weight) n + floor(f n) in all. With weights, the sources are interleaved so each one's share is even along
    the whole split: the next document comes from the source with the least (emitted + 1/2) / total. Without
    `data.mix`, sources follow one another in the order given.
    """

    def __init__(self, cfg: DataConfig, work: Path, groups: list[list[Source]]) -> None:
        self.cfg, self.work = cfg, work
        self.shards_of: list[list[int]] = []
        for group in groups:
            first = sum(map(len, self.shards_of))
            self.shards_of.append(list(range(first, first + len(group))))
        shards = sum(map(len, groups))
        self.duplicates = find_duplicates(work, shards, cfg.dedup, cfg.near_dedup if cfg.near_dedup.enabled else None)
        stats = [shard_stats(work, shard) for shard in range(shards)]
        self.read = sum(stat["read"] for stat in stats)
        self.kept = sum(stat["kept"] for stat in stats) - sum(self.duplicates.counts.values())
        self.dropped: Counter[str] = Counter(self.duplicates.counts)
        self.changed: Counter[str] = Counter()
        for stat in stats:
            self.dropped.update(stat["dropped"])
            self.changed.update(stat["changed"])
        self.contaminated = [entry for stat in stats for entry in stat["contaminated"]]
        counts = [self._count(shard) for shard in range(shards)]  # (train, val) kept per shard
        self.splits = {"train": [train for train, _ in counts], "val": [val for _, val in counts]}
        self.mix = [
            self._mix_entry(spec, shard_list) for spec, shard_list in zip(cfg.sources, self.shards_of, strict=True)
        ]
        self.packed_documents = sum(entry["documents_packed"] for entry in self.mix) + sum(self.splits["val"])

    def _count(self, shard: int) -> tuple[int, int]:
        """A shard's kept training and validation documents, duplicates left out (one read of its splits)."""
        is_val = shard_splits(self.work, shard).astype(bool)
        kept = np.ones(len(is_val), dtype=bool)
        removed = self.duplicates.removed.get(shard)
        if removed is not None:
            kept[removed] = False
        val = int((is_val & kept).sum())
        return int(kept.sum()) - val, val

    def _mix_entry(self, spec: str, shards: list[int]) -> dict[str, Any]:
        weight = self.cfg.mix.get(spec, 1.0)
        documents = sum(self.splits["train"][shard] for shard in shards)
        packed = int(weight) * documents + math.floor(documents * (weight - int(weight)))
        return {"source": spec, "weight": weight, "documents": documents, "documents_packed": packed}

    def documents(self, split: str, shards: list[int] | None = None) -> Iterator[CleanDocument]:
        for shard in range(len(self.splits["train"])) if shards is None else shards:
            keep = shard_splits(self.work, shard).astype(bool) == (split == "val")
            removed = self.duplicates.removed.get(shard)
            if removed is not None:
                keep[removed] = False
            for _, record in shard_documents(self.work, shard, keep):
                yield CleanDocument(record.text, split, record.bits)

    def mixed_training(self) -> Iterator[CleanDocument]:
        if not self.cfg.mix:  # no weights: the sources one after the other, as given
            yield from self.documents("train")
            return
        streams = [
            self._epochs(entry["weight"], shards) for entry, shards in zip(self.mix, self.shards_of, strict=True)
        ]
        totals = [entry["documents_packed"] for entry in self.mix]
        queue = [(0.5 / total, index, 0) for index, total in enumerate(totals) if total]
        heapq.heapify(queue)
        while queue:
            _, index, emitted = heapq.heappop(queue)
            yield next(streams[index])
            if emitted + 1 < totals[index]:
                heapq.heappush(queue, ((emitted + 1.5) / totals[index], index, emitted + 1))

    def _epochs(self, weight: float, shards: list[int]) -> Iterator[CleanDocument]:
        for _ in range(int(weight)):
            yield from self.documents("train", shards)
        fraction = weight - int(weight)
        if fraction:
            for i, doc in enumerate(self.documents("train", shards)):
                if math.floor((i + 1) * fraction) > math.floor(i * fraction):
                    yield doc

    def report(self) -> dict[str, Any]:
        """The manifest's account of curation: settings in effect, near-duplicate sample pairs, contamination."""
        report: dict[str, Any] = {"shards": len(self.splits["train"]), "contaminated": len(self.contaminated)}
        if self.cfg.near_dedup.enabled:
            mh = minhash_config(self.cfg.near_dedup)
            report["near_dedup"] = {
                "bands": mh.num_buckets,
                "rows": mh.hashes_per_bucket,
                "lsh_threshold": round((1 / mh.num_buckets) ** (1 / mh.hashes_per_bucket), 4),
                "candidates_checked": self.duplicates.candidates["checked"],
                "candidates_below_threshold": self.duplicates.candidates["below_threshold"],
                "sample_pairs": self._sample_pairs(),
            }
        return report

    def _sample_pairs(self) -> list[dict[str, str]]:
        wanted = {node for pair in self.duplicates.sample for node in pair}
        records: dict[tuple[int, int], Record] = {}
        for shard in sorted({shard for shard, _ in wanted}):
            for position, record in shard_documents(self.work, shard):
                if (shard, position) in wanted:
                    records[(shard, position)] = record
        return [
            {
                "removed": records[removed].origin,
                "kept": records[kept].origin,
                "removed_text": excerpt(records[removed].text),
                "kept_text": excerpt(records[kept].text),
            }
            for removed, kept in self.duplicates.sample
        ]
