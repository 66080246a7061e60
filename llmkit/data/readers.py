"""Readers: turn sources (files, globs, folders, hub datasets, the built-in corpus) into documents.

Every reader streams: it holds one line, row batch or file at a time, never the whole corpus.
Errors name the file and line (or row) and what was found there.
"""

from __future__ import annotations

import codecs
import csv
import importlib
import io
import json
import os
import re
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from llmkit.atomic import file_sha256
from llmkit.data.corpus import BUILTIN_CORPORA, generate
from llmkit.errors import UserError, did_you_mean
from llmkit.outputs import llmkit_wrote

SUFFIXES = {".txt", ".text", ".md", ".jsonl", ".json", ".csv", ".parquet"}
# Compressed text files are read as they stream (file.jsonl.gz is a .jsonl file); parquet compresses inside.
COMPRESSIONS = {".gz": "gzip", ".bz2": "bz2", ".xz": "lzma", ".zst": "zstandard", ".zstd": "zstandard"}
HUB_PREFIX = "hf:"
BUILTIN_PREFIX = "builtin:"


@dataclass(frozen=True)
class Source:
    """One resolved input: a file on disk, a hub dataset or a built-in corpus."""

    kind: str  # "file", "hub" or "builtin"
    name: str  # path, hub dataset name, or built-in corpus name
    size: int = 0
    sha256: str = ""
    mtime_ns: int = 0  # when it was hashed: a file changed since is not what the hash says

    def describe(self) -> dict[str, Any]:
        return {"kind": self.kind, "name": self.name, "size": self.size, "sha256": self.sha256}


def check_unchanged(sources: list[Source], command: str = "data-prep") -> None:
    """Refuse a result built from files that were deleted or changed after they were hashed: the hash recorded for
    them would describe text that was not read."""
    for source in sources:
        if source.kind != "file":
            continue
        try:
            stat = os.stat(source.name)
        except FileNotFoundError:
            raise UserError(f"{source.name}: deleted while {command} read it; nothing was kept") from None
        if (stat.st_size, stat.st_mtime_ns) != (source.size, source.mtime_ns):
            raise UserError(
                f"{source.name}: changed while {command} read it, so its recorded hash would be wrong; nothing was "
                "kept: run again once the file is final"
            )


@dataclass(frozen=True)
class RawDocument:
    text: str
    origin: str  # "file:line" or "file[row]" for messages
    bits: float | None = None  # exact -log2 p(text) for built-in corpora


def resolve_sources(specs: list[str], skip: list[str | Path] | None = None) -> list[Source]:
    """Expand globs and folders, check every file exists and is readable, hash it.

    Inside folders and globs, llmkit's own outputs (prepared datasets, runs, exports, staging directories) and
    the `skip` directories (the command's own output) are never read as data.
    """
    if not specs:
        raise UserError("no data sources given: pass files, folders or globs (or set data.sources)")
    groups: list[tuple[str, list[Source]]] = []
    for spec in specs:
        if spec.startswith(BUILTIN_PREFIX):
            name = spec.removeprefix(BUILTIN_PREFIX)
            if name not in BUILTIN_CORPORA:
                raise UserError(f"unknown built-in corpus '{spec}'{did_you_mean(name, BUILTIN_CORPORA)}")
            groups.append((spec, [Source("builtin", name)]))
        elif spec.startswith(HUB_PREFIX):
            groups.append((spec, [Source("hub", spec.removeprefix(HUB_PREFIX))]))
        else:
            groups.append((spec, _file_sources(spec, [Path(os.path.realpath(d)) for d in skip or []])))
    refuse_shared_files(groups)
    return [source for _, sources in groups for source in sources]


def refuse_shared_files(groups: list[tuple[str, list[Source]]], hint: str = "") -> None:
    """Refuse a file that two inputs both reach (a file named twice, a folder and a file in it): it would be read
    twice, silently doubling its weight, or validate on training rows. `groups`: (what the user named, its files)."""
    seen: dict[str, tuple[int, str]] = {}
    for number, (named, sources) in enumerate(groups):
        for source in sources:
            real = os.path.realpath(source.name) if source.kind == "file" else f"{source.kind}:{source.name}"
            first, before = seen.setdefault(real, (number, named))
            if first != number:
                how = "named twice" if before == named else f"reached through both {before} and {named}"
                shown = source.name if source.kind == "file" else named
                raise UserError(f"{shown}: {how}; {hint or 'name each source once (data.mix gives one more weight)'}")


def is_llmkit_output(directory: Path) -> bool:
    """A directory llmkit wrote (dataset, run, checkpoint, export) or is writing (a hidden staging directory)."""
    name = directory.name
    if name.startswith(".") and (".tmp-" in name or ".old-" in name):
        return True
    return llmkit_wrote(directory)


def _walk(folder: Path, skip: list[Path]) -> list[Path]:
    """Data files under `folder`, in sorted order, without llmkit outputs and the `skip` directories."""
    found: list[Path] = []
    for root, dirs, files in os.walk(folder):
        here = Path(root)
        dirs[:] = sorted(
            d for d in dirs if Path(os.path.realpath(here / d)) not in skip and not is_llmkit_output(here / d)
        )
        found += [here / f for f in files if data_suffix(Path(f)) in SUFFIXES]
    return sorted(found)


def _inside(path: Path, skip: list[Path]) -> bool:
    real = Path(os.path.realpath(path))
    return any(directory == real or directory in real.parents for directory in skip) or any(
        is_llmkit_output(parent) for parent in real.parents
    )


def _glob(spec: str) -> list[Path]:
    """The files a glob pattern names (`**` for any folders below; names starting with a dot only when the pattern
    says so), each real file once: symlinked folders are followed, never into a folder already visited (a link
    loop made Python's glob run for minutes), and two names of one file count as one."""
    parts = Path(spec).parts
    fixed = next((i for i, part in enumerate(parts) if any(ch in part for ch in "*?[")), len(parts))
    root = Path(*parts[:fixed]) if fixed else Path(".")
    pattern = re.compile(_glob_regex(parts[fixed:]))
    depth = None if "**" in parts[fixed:] else len(parts) - fixed - 1  # folders below the root to look into
    found, seen_folders, seen_files = [], set(), set()
    for here, dirs, files in os.walk(root, followlinks=True):
        real = os.path.realpath(here)
        below = len(Path(here).relative_to(root).parts)
        if real in seen_folders or (depth is not None and below > depth):
            dirs[:] = []
            continue
        seen_folders.add(real)
        dirs.sort()
        for name in sorted(files):
            path = Path(here) / name
            if pattern.fullmatch(path.relative_to(root).as_posix()) and path.is_file():
                key = os.path.realpath(path)
                if key not in seen_files:
                    seen_files.add(key)
                    found.append(path)
    return sorted(found)


def _glob_regex(parts: tuple[str, ...]) -> str:
    """A regular expression for the relative paths a glob's parts match, as `glob.glob(recursive=True)` does."""
    regex = ""
    for i, part in enumerate(parts):
        last = i == len(parts) - 1
        if part == "**":
            regex += "(?:(?!\\.)[^/]+/)*" + ("(?!\\.)[^/]*" if last else "")  # folders not hidden
            continue
        hidden_ok = part.startswith(".")
        segment = "" if hidden_ok else "(?!\\.)"
        j = 0
        while j < len(part):
            char = part[j]
            close = part.find("]", j + 2) if char == "[" else -1
            if char == "*":
                segment += "[^/]*"
            elif char == "?":
                segment += "[^/]"
            elif close != -1:
                body = part[j + 1 : close]
                segment += "[" + ("^" + body[1:] if body.startswith("!") else body).replace("\\", "\\\\") + "]"
                j = close
            else:
                segment += re.escape(char)
            j += 1
        regex += segment + ("" if last else "/")
    return regex


def _file_sources(spec: str, skip: list[Path]) -> list[Source]:
    path = Path(spec)
    if any(ch in spec for ch in "*?["):
        paths = [p for p in _glob(spec) if not _inside(p, skip)]
        if not paths:
            raise UserError(f"{spec}: no files match this pattern")
    elif path.is_dir():
        if is_llmkit_output(path):
            what = (
                "a prepared dataset (data-prep's tokens: `llmkit pretrain --data` reads it)"
                if (path / "manifest.json").is_file()
                else "an llmkit output (a run, checkpoint or export)"
            )
            raise UserError(f"{spec}: is {what}, not files of text or rows to read; give the source files")
        paths = _walk(path, skip)
        if not paths:
            raise UserError(f"{spec}: folder holds no {', '.join(sorted(SUFFIXES))} files (or .gz/.zst of them)")
    elif path.is_file():
        paths = [path]
    else:
        looks_like_hub = spec.count("/") == 1 and not spec.startswith((".", "/", "~")) and not path.suffix
        hint = f" (for a Hugging Face Hub dataset write {HUB_PREFIX}{spec})" if looks_like_hub else ""
        raise UserError(f"{spec}: file not found{hint}")
    sources = []
    for p in paths:
        suffix = data_suffix(p)
        if suffix not in SUFFIXES or (suffix == ".parquet" and compression(p)):
            raise UserError(
                f"{p}: unsupported file type '{''.join(p.suffixes[-2:])}' (use {', '.join(sorted(SUFFIXES))}, "
                f"the text ones also compressed as {', '.join(COMPRESSIONS)})"
            )
        stat = p.stat()  # before hashing: a change while hashing shows in check_unchanged
        sources.append(Source("file", str(p), stat.st_size, file_sha256(p), stat.st_mtime_ns))
    return sources


def read_documents(
    source: Source, text_field: str, txt_mode: str, builtin_docs: int, seed: int, encoding: str = "utf-8"
) -> Iterator[RawDocument]:
    """Stream the documents (one text each) of one source."""
    if source.kind == "builtin":
        for i, doc in enumerate(generate(BUILTIN_CORPORA[source.name], builtin_docs, seed)):
            yield RawDocument(doc.text, f"builtin:{source.name}[{i}]", doc.bits)
        return
    if source.kind == "file" and data_suffix(Path(source.name)) not in RECORD_SUFFIXES:
        yield from _read_txt(Path(source.name), txt_mode, encoding)
        return
    for record, where in read_records(source, required_column=text_field, encoding=encoding):
        yield RawDocument(_text_of(record, text_field, where), where)


RECORD_SUFFIXES = {".jsonl", ".json", ".csv", ".parquet"}


def read_records(
    source: Source, required_column: str | None = None, encoding: str = "utf-8"
) -> Iterator[tuple[dict[str, Any], str]]:
    """Stream the records (field -> value) of a jsonl/json/csv/parquet file or hub dataset, each with its
    location for messages. For csv and parquet a `required_column` is checked against the header first."""
    if source.kind == "hub":
        yield from _read_hub(source.name)
        return
    path = Path(source.name)
    suffix = data_suffix(path)
    if suffix == ".jsonl":
        yield from _read_jsonl(path, encoding)
    elif suffix == ".json":
        yield from _read_json(path, encoding)
    elif suffix == ".csv":
        yield from _read_csv(path, required_column, encoding)
    elif suffix == ".parquet":
        yield from _read_parquet(path, required_column)
    else:
        raise UserError(f"{path}: holds plain text, not records; use .jsonl, .json, .csv or .parquet")


def _text_of(record: Any, field: str, where: str) -> str:
    if not isinstance(record, dict):
        raise UserError(f"{where}: expected a JSON object with a '{field}' field, got {type(record).__name__}")
    if field not in record:
        found = ", ".join(sorted(map(str, record))) or "none"
        raise UserError(f"{where}: no '{field}' field (fields found: {found}); choose one with --text-field")
    value = record[field]
    if value is None:
        return ""
    if not isinstance(value, str):
        raise UserError(f"{where}: field '{field}' is {type(value).__name__}, expected text")
    return value


def compression(path: Path) -> str | None:
    """The module that decompresses this file (by its last suffix), or None for a plain file."""
    return COMPRESSIONS.get(path.suffix.lower())


def data_suffix(path: Path) -> str:
    """The suffix that says what a file holds: '.jsonl' for both data.jsonl and data.jsonl.gz."""
    return (path.with_suffix("") if compression(path) else path).suffix.lower()


def open_bytes(path: Path) -> BinaryIO:
    """The file's bytes, decompressed as they are read; a damaged archive is a one-line error when read."""
    module = compression(path)
    if module is None:
        return path.open("rb")
    if module == "zstandard":
        return io.BufferedReader(_ZstdFrames(path), buffer_size=1 << 20)
    return importlib.import_module(module).open(path, "rb")


class _ZstdFrames(io.RawIOBase):
    """A .zst file's bytes, frame after frame. A file that ends inside a frame raises EOFError, as gzip, bz2 and
    lzma do (zstandard's own stream reader returns what it has and stops: a truncated file read as shorter, or as
    empty)."""

    def __init__(self, path: Path) -> None:
        import zstandard

        self.file = path.open("rb")
        self.decompressor = zstandard.ZstdDecompressor()
        self.frame = self.decompressor.decompressobj()
        self.inside = False  # the current frame has had input and not ended
        self.pending = b""

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        while not self.pending:
            chunk = self.file.read(1 << 20)
            if not chunk:
                if self.inside:
                    raise EOFError("the file ends inside a zstd frame")
                return 0
            self.pending = self._decompress(chunk)
        size = min(len(buffer), len(self.pending))
        buffer[:size] = self.pending[:size]
        self.pending = self.pending[size:]
        return size

    def _decompress(self, chunk: bytes) -> bytes:
        out = []
        while chunk:
            self.inside = True
            out.append(self.frame.decompress(chunk))
            if not self.frame.eof:
                break
            chunk, self.inside = self.frame.unused_data, False
            self.frame = self.decompressor.decompressobj()
        return b"".join(out)

    def close(self) -> None:
        self.file.close()
        super().close()


def read_bytes(path: Path) -> bytes:
    with open_bytes(path) as handle, _damaged(path):
        return handle.read()


@contextmanager
def _damaged(path: Path) -> Iterator[None]:
    """A truncated or corrupt compressed file as one line naming it."""
    import gzip
    import lzma
    import zlib

    errors: tuple[type[Exception], ...] = (EOFError, gzip.BadGzipFile, lzma.LZMAError, zlib.error, OSError)
    if compression(path) == "zstandard":
        import zstandard

        errors += (zstandard.ZstdError,)
    try:
        yield
    except errors as exc:
        if compression(path) is None or getattr(exc, "errno", None) is not None:
            raise
        raise UserError(
            f"{path}: damaged or truncated {path.suffix} file ({exc}); download or compress it again"
        ) from None


def check_encoding(encoding: str) -> str:
    """The codec's canonical name, or a one-line error for one Python does not know."""
    try:
        return codecs.lookup(encoding).name
    except LookupError:
        raise UserError(f"--encoding {encoding}: unknown text encoding (e.g. utf-8, latin-1, cp1252)") from None


def decode(data: bytes, path: Path, encoding: str, line: int | None = None, offset: int = 0) -> str:
    """Text of `data` (bytes of `path` from byte `offset`), or a one-line error naming the file and byte offset.

    Undecodable bytes are never replaced silently: a Latin-1 file read as UTF-8 would train on U+FFFD.
    A UTF-8 byte-order mark at the start of a file is a BOM, not text.
    """
    try:
        return data.decode("utf-8-sig" if offset == 0 and encoding in ("utf-8", "utf8") else encoding)
    except UnicodeDecodeError as exc:
        where = f"{path}:{line}" if line is not None else str(path)
        bad = data[exc.start : exc.start + 1].hex()
        marked = next((name for bom, name in _BOMS if offset == 0 and data.startswith(bom)), None)
        guess = f"it starts with a {marked} byte-order mark: --encoding {marked}" if marked else "e.g. latin-1"
        raise UserError(
            f"{where}: byte 0x{bad} at offset {offset + exc.start} is not valid {encoding}; convert the file to "
            f"UTF-8, or pass --encoding with its real encoding ({guess})"
        ) from None


# Byte-order marks of the encodings a file may carry without saying so, UTF-32's before UTF-16's (a prefix of it).
_BOMS = (
    (codecs.BOM_UTF32_LE, "utf-32"),
    (codecs.BOM_UTF32_BE, "utf-32"),
    (codecs.BOM_UTF16_LE, "utf-16"),
    (codecs.BOM_UTF16_BE, "utf-16"),
)


def read_lines(path: Path, encoding: str) -> Iterator[tuple[int, str]]:
    """(line number, text) of every line, decoded strictly (errors name the line and byte offset)."""
    if check_encoding(encoding).startswith(("utf-16", "utf-32")):  # lines cannot be split as bytes
        yield from enumerate(decode(read_bytes(path), path, encoding).splitlines(True), start=1)
        return
    offset = 0
    with open_bytes(path) as handle, _damaged(path):
        lines = io.BufferedReader(handle) if compression(path) else handle  # type: ignore[type-var]
        for number, raw in enumerate(lines, start=1):
            yield number, decode(raw, path, encoding, number, offset)
            offset += len(raw)


def _read_jsonl(path: Path, encoding: str) -> Iterator[tuple[dict[str, Any], str]]:
    for number, line in read_lines(path, encoding):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise UserError(f"{where}: malformed JSON ({exc.msg} at column {exc.colno})") from None
        yield record, where


def _read_json(path: Path, encoding: str) -> Iterator[tuple[dict[str, Any], str]]:
    check_encoding(encoding)
    text = decode(read_bytes(path), path, encoding)
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise UserError(f"{path}:{exc.lineno}: malformed JSON ({exc.msg})") from None
    records = data if isinstance(data, list) else [data]
    for i, record in enumerate(records):
        yield record, f"{path}[{i}]"


def _read_csv(path: Path, required: str | None, encoding: str) -> Iterator[tuple[dict[str, Any], str]]:
    csv.field_size_limit(sys.maxsize)
    reader = csv.DictReader(line for _, line in read_lines(path, encoding))
    columns = reader.fieldnames or []
    if required is not None and required not in columns:
        found = ", ".join(columns) or "none"
        raise UserError(f"{path}:1: no '{required}' column (columns found: {found}); choose one with --text-field")
    for row in reader:
        yield dict(row), f"{path}:{reader.line_num}"


def _read_parquet(path: Path, required: str | None) -> Iterator[tuple[dict[str, Any], str]]:
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(path)
    except Exception as exc:  # pyarrow raises several types for a file that is not parquet
        raise UserError(f"{path}: not a readable parquet file ({exc})") from None
    columns = parquet.schema_arrow.names
    if required is not None and required not in columns:
        found = ", ".join(columns) or "none"
        raise UserError(f"{path}: no '{required}' column (columns found: {found}); choose one with --text-field")
    row = 0
    for batch in parquet.iter_batches(columns=[required] if required else None, batch_size=4096):
        for record in batch.to_pylist():
            yield record, f"{path}[row {row}]"
            row += 1


def _read_txt(path: Path, mode: str, encoding: str) -> Iterator[RawDocument]:
    check_encoding(encoding)
    if mode == "file":
        yield RawDocument(decode(read_bytes(path), path, encoding), str(path))
        return
    lines = read_lines(path, encoding)
    if mode == "line":
        for number, line in lines:
            yield RawDocument(line, f"{path}:{number}")
        return
    block: list[str] = []
    start = 1
    for number, line in lines:
        if line.strip():
            if not block:
                start = number
            block.append(line)
        elif block:
            yield RawDocument("".join(block), f"{path}:{start}")
            block = []
    if block:
        yield RawDocument("".join(block), f"{path}:{start}")


def _read_hub(name: str) -> Iterator[tuple[dict[str, Any], str]]:
    """Stream a hub dataset: `hf:owner/name`, optionally `hf:owner/name:config` (its train split)."""
    from llmkit.hub import prepare_hub_access

    repo, _, config = name.partition(":")
    prepare_hub_access(repo)
    import datasets

    try:
        stream = datasets.load_dataset(repo, config or None, split="train", streaming=True)
        iterator = iter(stream)
        first = next(iterator, None)
    except Exception as exc:  # datasets raises many types (ConnectionError, FileNotFoundError, HfHubHTTPError...)
        raise UserError(
            f"hf:{name}: cannot load this Hugging Face Hub dataset ({type(exc).__name__}); "
            "check the name and your network, or download it and pass the files"
        ) from None
    if first is None:
        return
    yield dict(first), f"hf:{name}[0]"
    for i, record in enumerate(iterator, start=1):
        yield dict(record), f"hf:{name}[{i}]"
