"""Readers: turn sources (files, globs, folders, hub datasets, the built-in corpus) into documents.

Every reader streams: it holds one line, row batch or file at a time, never the whole corpus.
Errors name the file and line (or row) and what was found there.
"""

from __future__ import annotations

import csv
import glob
import json
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llmkit.atomic import file_sha256
from llmkit.data.corpus import BUILTIN_CORPORA, generate
from llmkit.errors import UserError, did_you_mean

SUFFIXES = {".txt", ".text", ".md", ".jsonl", ".json", ".csv", ".parquet"}
HUB_PREFIX = "hf:"
BUILTIN_PREFIX = "builtin:"


@dataclass(frozen=True)
class Source:
    """One resolved input: a file on disk, a hub dataset or a built-in corpus."""

    kind: str  # "file", "hub" or "builtin"
    name: str  # path, hub dataset name, or built-in corpus name
    size: int = 0
    sha256: str = ""

    def describe(self) -> dict[str, Any]:
        return {"kind": self.kind, "name": self.name, "size": self.size, "sha256": self.sha256}


@dataclass(frozen=True)
class RawDocument:
    text: str
    origin: str  # "file:line" or "file[row]" for messages
    bits: float | None = None  # exact -log2 p(text) for built-in corpora


def resolve_sources(specs: list[str]) -> list[Source]:
    """Expand globs and folders, check every file exists and is readable, hash it."""
    if not specs:
        raise UserError("no data sources given: pass files, folders or globs (or set data.sources)")
    sources: list[Source] = []
    for spec in specs:
        if spec.startswith(BUILTIN_PREFIX):
            name = spec.removeprefix(BUILTIN_PREFIX)
            if name not in BUILTIN_CORPORA:
                raise UserError(f"unknown built-in corpus '{spec}'{did_you_mean(name, BUILTIN_CORPORA)}")
            sources.append(Source("builtin", name))
        elif spec.startswith(HUB_PREFIX):
            sources.append(Source("hub", spec.removeprefix(HUB_PREFIX)))
        else:
            sources.extend(_file_sources(spec))
    return sources


def _file_sources(spec: str) -> list[Source]:
    path = Path(spec)
    if any(ch in spec for ch in "*?["):
        paths = sorted(Path(p) for p in glob.glob(spec, recursive=True) if Path(p).is_file())
        if not paths:
            raise UserError(f"{spec}: no files match this pattern")
    elif path.is_dir():
        paths = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in SUFFIXES)
        if not paths:
            raise UserError(f"{spec}: folder holds no {', '.join(sorted(SUFFIXES))} files")
    elif path.is_file():
        paths = [path]
    else:
        looks_like_hub = spec.count("/") == 1 and not spec.startswith((".", "/", "~")) and not path.suffix
        hint = f" (for a Hugging Face Hub dataset write {HUB_PREFIX}{spec})" if looks_like_hub else ""
        raise UserError(f"{spec}: file not found{hint}")
    sources = []
    for p in paths:
        if p.suffix.lower() not in SUFFIXES:
            raise UserError(f"{p}: unsupported file type '{p.suffix}' (use {', '.join(sorted(SUFFIXES))})")
        sources.append(Source("file", str(p), p.stat().st_size, file_sha256(p)))
    return sources


def read_documents(
    source: Source, text_field: str, txt_mode: str, builtin_docs: int, seed: int
) -> Iterator[RawDocument]:
    """Stream the documents (one text each) of one source."""
    if source.kind == "builtin":
        for i, doc in enumerate(generate(BUILTIN_CORPORA[source.name], builtin_docs, seed)):
            yield RawDocument(doc.text, f"builtin:{source.name}[{i}]", doc.bits)
        return
    if source.kind == "file" and Path(source.name).suffix.lower() not in RECORD_SUFFIXES:
        yield from _read_txt(Path(source.name), txt_mode)
        return
    for record, where in read_records(source, required_column=text_field):
        yield RawDocument(_text_of(record, text_field, where), where)


RECORD_SUFFIXES = {".jsonl", ".json", ".csv", ".parquet"}


def read_records(source: Source, required_column: str | None = None) -> Iterator[tuple[dict[str, Any], str]]:
    """Stream the records (field -> value) of a jsonl/json/csv/parquet file or hub dataset, each with its
    location for messages. For csv and parquet a `required_column` is checked against the header first."""
    if source.kind == "hub":
        yield from _read_hub(source.name)
        return
    path = Path(source.name)
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        yield from _read_jsonl(path)
    elif suffix == ".json":
        yield from _read_json(path)
    elif suffix == ".csv":
        yield from _read_csv(path, required_column)
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


def _read_jsonl(path: Path) -> Iterator[tuple[dict[str, Any], str]]:
    with path.open(encoding="utf-8", errors="replace") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            where = f"{path}:{number}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise UserError(f"{where}: malformed JSON ({exc.msg} at column {exc.colno})") from None
            yield record, where


def _read_json(path: Path) -> Iterator[tuple[dict[str, Any], str]]:
    text = path.read_text(encoding="utf-8", errors="replace")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise UserError(f"{path}:{exc.lineno}: malformed JSON ({exc.msg})") from None
    records = data if isinstance(data, list) else [data]
    for i, record in enumerate(records):
        yield record, f"{path}[{i}]"


def _read_csv(path: Path, required: str | None) -> Iterator[tuple[dict[str, Any], str]]:
    csv.field_size_limit(sys.maxsize)
    with path.open(encoding="utf-8", errors="replace", newline="") as handle:
        reader = csv.DictReader(handle)
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


def _read_txt(path: Path, mode: str) -> Iterator[RawDocument]:
    if mode == "file":
        yield RawDocument(path.read_text(encoding="utf-8", errors="replace"), str(path))
        return
    with path.open(encoding="utf-8", errors="replace") as handle:
        if mode == "line":
            for number, line in enumerate(handle, start=1):
                yield RawDocument(line, f"{path}:{number}")
            return
        block: list[str] = []
        start = 1
        for number, line in enumerate(handle, start=1):
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
