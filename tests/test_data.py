"""data-prep units: cleaning, dedup, split, packing, readers, tokenizer, fingerprint reuse."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from transformers import AutoTokenizer

from llmkit.config import DataConfig
from llmkit.data.cleaning import clean_text, is_validation
from llmkit.data.prep import prepare_dataset
from llmkit.data.readers import read_documents, resolve_sources
from llmkit.data.store import ShardWriter, open_dataset
from llmkit.data.tokenizer import char_counts, train_bpe
from tests.conftest import run_cli

WORDS = [
    "alpha",
    "beta",
    "gamma",
    "delta",
    "epsilon",
    "zeta",
    "eta",
    "theta",
    "iota",
    "kappa",
    "lambda",
    "mu",
]


def corpus(n: int, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(WORDS, size=rng.integers(5, 40))) + "." for _ in range(n)]


def test_clean_text_normalizes_unicode_and_whitespace() -> None:
    assert clean_text("  cafe\u0301 \t au  lait \r\n\r\n\r\n\nfin  ", "NFC") == "caf\u00e9 au lait\n\nfin"
    assert clean_text("\ufb01ne", "NFKC") == "fine"
    assert clean_text("a\x00b\x07c", "none") == "abc"


def test_split_is_deterministic_by_document_and_near_the_fraction() -> None:
    texts = corpus(4000)
    first = [is_validation(t, 0.1, seed=0) for t in texts]
    shuffled = list(reversed(texts))
    second = {t: is_validation(t, 0.1, seed=0) for t in shuffled}
    assert first == [second[t] for t in texts]  # order does not matter, only the text
    assert 0.08 < np.mean(first) < 0.12
    assert [is_validation(t, 0.1, seed=1) for t in texts] != first
    assert not any(is_validation(t, 0.0, seed=0) for t in texts)


def test_packing_keeps_the_stream_and_reports_the_remainder(tmp_path: Path) -> None:
    writer = ShardWriter(tmp_path / "train", block_size=8, dtype=np.dtype(np.uint16), blocks_per_shard=3)
    stream = np.arange(1, 60, dtype=np.uint32)
    for piece in np.split(stream, [5, 6, 20, 41]):
        writer.add(piece)
    assert writer.blocks == 59 // 8 and writer.remainder == 59 % 8
    assert [s["blocks"] for s in writer.shards] == [3, 3, 1]
    written = np.concatenate([np.fromfile(tmp_path / s["file"], dtype=np.uint16) for s in writer.shards])
    assert np.array_equal(written, stream[: 7 * 8])


def test_readers_for_every_format(tmp_path: Path) -> None:
    (tmp_path / "a.jsonl").write_text('{"body": "one"}\n\n{"body": "two"}\n')
    (tmp_path / "b.json").write_text(json.dumps([{"body": "three"}, {"body": None}]))
    with (tmp_path / "c.csv").open("w", newline="") as handle:
        csv.writer(handle).writerows([["id", "body"], [1, "four"], [2, "five, with comma"]])
    pq.write_table(pa.table({"body": ["six", "seven"]}), tmp_path / "d.parquet")
    (tmp_path / "e.txt").write_text("eight\nnine\n\nten\n")
    texts = {}
    for source in resolve_sources([str(tmp_path)]):
        texts[Path(source.name).name] = [d.text for d in read_documents(source, "body", "blank_line", 0, 0)]
    assert texts == {
        "a.jsonl": ["one", "two"],
        "b.json": ["three", ""],
        "c.csv": ["four", "five, with comma"],
        "d.parquet": ["six", "seven"],
        "e.txt": ["eight\nnine\n", "ten\n"],
    }
    txt = resolve_sources([str(tmp_path / "e.txt")])[0]
    assert [d.text for d in read_documents(txt, "text", "line", 0, 0)] == ["eight\n", "nine\n", "\n", "ten\n"]
    assert [d.text for d in read_documents(txt, "text", "file", 0, 0)] == ["eight\nnine\n\nten\n"]
    globbed = resolve_sources([str(tmp_path / "*.jsonl")])
    assert [Path(s.name).name for s in globbed] == ["a.jsonl"] and len(globbed[0].sha256) == 64


def test_trained_tokenizer_loads_with_autotokenizer_and_round_trips(tmp_path: Path) -> None:
    tokenizer = train_bpe(corpus(300), vocab_size=300)
    tokenizer.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    text = "alpha beta gamma, ünïcödé and 😀 survive"
    assert loaded.decode(loaded(text)["input_ids"]) == text
    assert loaded.eos_token == "<|endoftext|>" and loaded.pad_token == "<|pad|>"
    assert loaded.bos_token_id == loaded.eos_token_id != loaded.pad_token_id
    assert len(loaded) <= 300


def test_char_counts_are_exact_for_byte_level_tokens() -> None:
    tokenizer = train_bpe(corpus(200) + ["naïve café 😀 ünïcödé"] * 20, vocab_size=320)
    counts = char_counts(tokenizer)
    for text in ["alpha beta.", "naïve café 😀 ünïcödé", "日本語のテキスト"]:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        assert counts[ids].sum() == len(text)
    assert counts[tokenizer.eos_token_id] == 0


def write_jsonl(path: Path, texts: list[str]) -> Path:
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    return path


def data_config(path: Path, **overrides) -> DataConfig:
    settings = {"sources": [str(path)], "vocab_size": 300, "block_size": 16, "val_fraction": 0.1}
    return DataConfig(**{**settings, **overrides})


def test_prepare_writes_manifest_shards_and_tokenizer(tmp_path: Path) -> None:
    texts = corpus(500)
    source = write_jsonl(tmp_path / "in.jsonl", texts + texts[:20])  # 20 exact duplicates
    result = prepare_dataset(data_config(source), tmp_path / "ds")
    manifest = result.manifest
    assert manifest["documents"] == {
        "read": 520,
        "kept": len(set(texts)),
        "dropped": {"duplicate": 20 + 500 - len(set(texts))},
        "changed": {},
    }
    assert manifest["sources"][0]["sha256"] and manifest["sources"][0]["size"] == source.stat().st_size
    splits = manifest["splits"]
    assert splits["train"]["documents"] + splits["val"]["documents"] == len(set(texts))
    for split in ("train", "val"):
        info = splits[split]
        assert info["blocks"] * 16 + info["remainder_tokens"] == info["tokens"]
    dataset = open_dataset(tmp_path / "ds")
    tokenizer = AutoTokenizer.from_pretrained(dataset.tokenizer_dir)
    train = dataset.split("train")
    assert len(train) == splits["train"]["blocks"]
    stream = train.blocks(range(len(train))).reshape(-1)
    eos_count = int((stream == tokenizer.eos_token_id).sum())
    docs = splits["train"]["documents"]
    assert eos_count in (docs, docs - 1)  # one EOS after each document; the remainder may hold the last
    pieces = tokenizer.decode(stream).split(tokenizer.eos_token)
    assert all(piece in set(texts) for piece in pieces[:-1])


def test_same_inputs_reuse_and_changed_inputs_rebuild(tmp_path: Path) -> None:
    source = write_jsonl(tmp_path / "in.jsonl", corpus(300))
    first = prepare_dataset(data_config(source), tmp_path / "ds")
    assert not first.reused
    again = prepare_dataset(data_config(source, workers=2, batch_docs=7), tmp_path / "ds")
    assert again.reused and again.manifest["fingerprint"] == first.manifest["fingerprint"]
    write_jsonl(source, corpus(300, seed=1))  # same path, new content
    changed = prepare_dataset(data_config(source), tmp_path / "ds")
    assert not changed.reused and changed.manifest["fingerprint"] != first.manifest["fingerprint"]
    settings = prepare_dataset(data_config(source, block_size=8), tmp_path / "ds")
    assert not settings.reused and settings.manifest["block_size"] == 8
    assert not list(tmp_path.glob(".ds.*"))  # no staging directories left behind


def test_the_summary_says_why_a_split_left_no_validation_block(tmp_path: Path) -> None:
    def summary(source: Path, *args: str, block_size: int = 16) -> str:
        out = tmp_path / f"ds-{source.name}"
        sizes = ["--vocab-size", "300", "--block-size", str(block_size)]
        result = run_cli("data-prep", source, "--out", out, *sizes, *args)
        assert result.exit_code == 0, result.stderr
        return " ".join(result.stdout.split())

    book = tmp_path / "book.txt"
    book.write_text("\n\n".join(corpus(200)))  # one document unless split
    assert "put none there (a text file is one document: data.txt_mode line or blank_line" in summary(book)
    assert "validation none" not in summary(book, "--set", "data.txt_mode=blank_line")
    rows = write_jsonl(tmp_path / "rows.jsonl", corpus(20))  # 10% of 20 short documents: under one block of 128
    said = summary(rows, block_size=128)
    assert "validation none: training will run without validation" in said
    assert "a text file is one document" not in said


def test_worker_processes_give_identical_output(tmp_path: Path) -> None:
    source = write_jsonl(tmp_path / "in.jsonl", corpus(400))
    tokenizer = train_bpe(corpus(400), vocab_size=300)
    tokenizer.save_pretrained(tmp_path / "tok")
    one = prepare_dataset(data_config(source, tokenizer=str(tmp_path / "tok")), tmp_path / "one")
    two = prepare_dataset(
        data_config(source, tokenizer=str(tmp_path / "tok"), workers=2, batch_docs=25), tmp_path / "two"
    )
    assert one.manifest["fingerprint"] == two.manifest["fingerprint"]
    for split in ("train", "val"):
        a = open_dataset(tmp_path / "one").split(split)
        b = open_dataset(tmp_path / "two").split(split)
        assert np.array_equal(a.blocks(range(len(a))), b.blocks(range(len(b))))


def test_builtin_corpus_records_its_entropy_floor(tiny_dataset: Path) -> None:
    manifest = open_dataset(tiny_dataset).manifest
    entropy = manifest["entropy"]
    assert entropy["corpus"] == "builtin:stories"
    assert 0.3 < entropy["bits_per_char_expected"] < 0.5
    assert entropy["bits_per_char"]["val"] == pytest.approx(entropy["bits_per_char_expected"], rel=0.1)
