"""Data curation at corpus scale: quality rules, PII, near-dedup on planted truth, decontamination, mixing, shards
curated by several processes (the same bytes) and resumed after a kill."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from llmkit.config import DataConfig, QualityConfig
from llmkit.data import quality
from llmkit.data.cleaning import clean_text
from llmkit.data.curate import Shingles, jaccard
from llmkit.data.planted import graded_copies, planted_corpus
from llmkit.data.prep import prepare_dataset
from llmkit.data.store import open_dataset
from tests.conftest import assert_user_error, run_cli

PROSE = (
    "The river ran past the old mill, and the children of the village went down to the water every morning. "
    "They watched the boats that came with flour and salt, and they waved to the men who worked on them. "
    "In the evening the light was soft and golden over the fields, and the mothers called them home to eat. "
)


def write_jsonl(path: Path, texts: list[str]) -> Path:
    path.write_text("".join(json.dumps({"text": text}) + "\n" for text in texts), encoding="utf-8")
    return path


def documents(dataset: Path) -> list[str]:
    """Every document of both splits, decoded from the packed blocks (the last one may be cut by the remainder)."""
    prepared = open_dataset(dataset)
    tokenizer = AutoTokenizer.from_pretrained(prepared.tokenizer_dir)
    texts: list[str] = []
    for split in ("train", "val"):
        packed = prepared.split(split)
        tokens = packed.blocks(list(range(len(packed)))).reshape(-1).tolist() if len(packed) else []
        texts += tokenizer.decode(tokens).split(tokenizer.eos_token)
    return texts


def config(sources: list[str], **settings) -> DataConfig:
    return DataConfig(**{"sources": sources, "vocab_size": 400, "block_size": 16, **settings})


def test_quality_rules_on_documents_built_to_fail_one_rule_each() -> None:
    q = QualityConfig()
    assert quality.gopher_quality(PROSE, q) is None and quality.gopher_repetition(PROSE, q) is None
    assert quality.gopher_repetition("\n".join(["Buy cheap shoes now."] * 5 + [PROSE]), q) == (
        "gopher_repetition:duplicate_lines"
    )
    assert quality.gopher_repetition(PROSE + " ".join(["click here to win"] * 40), q).startswith("gopher_repetition")
    assert quality.gopher_quality("Too short to be a page.", q) == "gopher_quality:word_count"
    assert quality.gopher_quality(PROSE + " #tag" * 30, q) == "gopher_quality:symbols"
    assert quality.gopher_quality("\n".join(f"- item {i} of the list and more" for i in range(60)), q) == (
        "gopher_quality:bullet_lines"
    )
    assert quality.gopher_quality(" ".join(["xkcd", "zzz", "qqq"] * 30), q) == "gopher_quality:stop_words"
    body = (PROSE + PROSE).replace(". ", ".\n").strip()  # six sentences, one per line
    kept, removed, reason = quality.c4_lines(f"Menu\n{body}\nEnable javascript, please.", q)
    assert (removed, reason) == (2, None) and "Menu" not in kept and "javascript" not in kept
    assert quality.c4_lines(PROSE + " function() { return 1; }", q)[2] == "c4:curly_bracket"
    assert quality.c4_lines("One sentence only.", q)[2] == "c4:too_few_sentences"
    english = quality.LanguageFilter(["en"], 0.65)
    assert english(PROSE) is None
    assert english("Der Fluss lief an der alten Mühle vorbei, und die Kinder gingen jeden Morgen zum Wasser.")
    masked, counts = quality.mask_pii("Write to jane.doe@mail.example.org from 10.1.2.3 or fe80::1:2ff:fe3:4, v1.2.3.4")
    assert masked == "Write to email@example.com from 192.0.2.1 or 2001:db8::1, v1.2.3.4"
    assert counts == {"pii_emails": 1, "pii_ipv4": 1, "pii_ipv6": 1}


def test_filters_count_every_drop_and_change_in_the_manifest(tmp_path: Path) -> None:
    texts = [
        PROSE + "Mail jane@corp.example.com today.",  # kept, one e-mail masked
        PROSE.replace("river", "stream"),  # kept
        "Too short to be a page.",  # gopher_quality:word_count
        "\n".join(["Buy cheap shoes now."] * 5 + [PROSE]),  # gopher_repetition:duplicate_lines
        "Der Fluss lief an der alten Mühle vorbei, und die Kinder gingen jeden Morgen zum Wasser. " * 6,  # language
        PROSE + "Mail jane@corp.example.com today.",  # duplicate
        "",  # empty
    ]
    quality_on = {"gopher_repetition": True, "gopher_quality": True, "languages": ["en"]}
    cfg = config([str(write_jsonl(tmp_path / "in.jsonl", texts))], quality=quality_on, pii=True, val_fraction=0)
    manifest = prepare_dataset(cfg, tmp_path / "ds").manifest
    assert manifest["documents"] == {
        "read": 7,
        "kept": 2,
        "dropped": {
            "duplicate": 1,
            "empty": 1,
            "gopher_quality:word_count": 1,
            "gopher_repetition:duplicate_lines": 1,
            "language": 1,
        },
        "changed": {"pii_emails": 2},  # counted as read: the masked copy was then an exact duplicate
    }
    kept = documents(tmp_path / "ds")
    assert kept[0].endswith("Mail email@example.com today.")


def test_exact_duplicates_are_found_across_sorted_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    texts = [f"{PROSE} Page {i % 13}." for i in range(40)]  # 13 distinct pages, 27 copies
    source = [str(write_jsonl(tmp_path / "in.jsonl", texts))]
    prepare_dataset(config(source), tmp_path / "whole")
    monkeypatch.setattr("llmkit.data.curate.RUN_DOCS", 3)  # digests written in sorted runs of 3
    runs = prepare_dataset(config(source), tmp_path / "runs")
    assert runs.manifest["documents"]["dropped"] == {"duplicate": 27}
    assert dataset_bytes(tmp_path / "runs") == dataset_bytes(tmp_path / "whole")


def test_near_duplicates_are_found_with_measured_precision_and_recall(tmp_path: Path) -> None:
    planted = planted_corpus(originals=240, seed=3)
    last = "A last page, cut short by the final partial block in place of a page that counts. " * 4
    source = write_jsonl(tmp_path / "web.jsonl", [*planted.texts, last])
    cfg = config([str(source)], near_dedup={"enabled": True, "threshold": 0.7}, val_fraction=0)
    manifest = prepare_dataset(cfg, tmp_path / "ds").manifest
    survivors = set(documents(tmp_path / "ds"))
    cleaned = [clean_text(text, "NFC") for text in planted.texts]
    removed_copies = sum(cleaned[copy] not in survivors for copy in planted.copies)
    originals_lost = sum(text not in survivors for i, text in enumerate(cleaned) if i not in planted.copies)
    removed = manifest["documents"]["dropped"]["near_duplicate"]
    recall, precision = removed_copies / len(planted.copies), removed_copies / removed
    assert recall >= 0.9 and precision >= 0.98, (recall, precision)
    assert originals_lost == 0  # related pages (half their paragraphs shared) included
    near = manifest["curation"]["near_dedup"]
    assert (near["bands"], near["rows"]) == (25, 5)  # 99% of pairs at 0.75 become candidates
    assert near["candidates_checked"] >= removed
    pair = near["sample_pairs"][0]
    assert pair["removed"].startswith(str(source)) and pair["kept_text"] and pair["removed_text"]


def test_near_dedup_finds_pairs_just_above_the_threshold_and_none_below(tmp_path: Path) -> None:
    """Copies whose true word-5-gram Jaccard similarity covers 0.4 to 1: at the default threshold 0.8, at least 95%
    of those at 0.85 or more are removed (bands split at the threshold found 81% of 0.82-0.95), none below 0.8 (every
    candidate is checked on its true similarity), and no original."""
    graded = graded_copies(150, seed=2)
    last = "A last page, cut short by the final partial block in place of a page that counts. " * 4
    source = write_jsonl(tmp_path / "pages.jsonl", [*graded.texts, last])
    cfg = config([str(source)], near_dedup={"enabled": True}, val_fraction=0)
    manifest = prepare_dataset(cfg, tmp_path / "ds").manifest
    survivors = set(documents(tmp_path / "ds"))
    cleaned = [clean_text(text, "NFC") for text in graded.texts]
    shingles = Shingles(cfg.near_dedup, tmp_path / "scratch")
    truth = {copy: jaccard(shingles(cleaned[copy]), shingles(cleaned[original]))
             for copy, original in graded.copies.items() if cleaned[copy] != cleaned[original]}  # fmt: skip
    gone = {copy for copy in truth if cleaned[copy] not in survivors}
    above = [copy for copy, s in truth.items() if s >= 0.85]
    below = [copy for copy, s in truth.items() if s < 0.8]
    assert len(above) >= 20 and len(below) >= 50
    assert sum(copy in gone for copy in above) / len(above) >= 0.95
    assert not gone & set(below)
    assert all(cleaned[original] in survivors for original in graded.copies.values())
    assert manifest["curation"]["near_dedup"]["candidates_below_threshold"] > 0  # the check had work to do


def test_decontamination_drops_or_flags_planted_leaks(tmp_path: Path) -> None:
    question = "Which river ran past the old mill where the children of the village went every single morning?"
    items = [{"question": question, "choices": ["the Avon", "the Thames"], "answer": 0}]
    task = tmp_path / "task.yaml"
    task.write_text(json.dumps({"name": "mill", "kind": "multiple_choice", "items": items}), encoding="utf-8")
    leaked = [
        PROSE + "\n\nQuiz: which RIVER ran past the old mill, where the children of the village went every single "
        "morning? The Avon.",
        "Answer key\n" + question.upper(),
    ]
    clean = [PROSE.replace("river", f"brook {i}") for i in range(6)]
    source = str(write_jsonl(tmp_path / "train.jsonl", clean[:3] + leaked + clean[3:]))
    drop = prepare_dataset(config([source], decontaminate={"tasks": [str(task)]}), tmp_path / "ds").manifest
    assert drop["documents"]["dropped"] == {"contaminated": 2} and drop["curation"]["contaminated"] == 2
    audit = [json.loads(line) for line in (tmp_path / "ds" / "audit.jsonl").read_text().splitlines()]
    assert [(entry["doc"], entry["item"], entry["action"]) for entry in audit] == [
        (f"{source}:4", "mill item 1", "drop"),
        (f"{source}:5", "mill item 1", "drop"),
    ]
    flag = prepare_dataset(config([source], decontaminate={"tasks": [str(task)], "action": "flag"}), tmp_path / "f")
    assert flag.manifest["documents"]["kept"] == 8 and flag.manifest["curation"]["contaminated"] == 2
    assert len((tmp_path / "f" / "audit.jsonl").read_text().splitlines()) == 2


def test_decontamination_reads_lm_evaluation_harness_tasks_on_disk(tmp_path: Path) -> None:
    pytest.importorskip("lm_eval")
    question = "Which river ran past the old mill where the children of the village went every single morning?"
    items = write_jsonl(tmp_path / "items.jsonl", [])
    items.write_text(json.dumps({"question": question, "choices": ["the Avon", "the Thames"], "answer": 0}) + "\n")
    (tmp_path / "theirs.yaml").write_text(
        f"task: theirs\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {items}\ntest_split: test\n"
        "output_type: multiple_choice\ndoc_to_text: '{{question}}'\ndoc_to_choice: '{{choices}}'\n"
        "doc_to_target: '{{answer}}'\nmetric_list:\n  - metric: acc\n"
    )
    source = str(write_jsonl(tmp_path / "train.jsonl", [PROSE, f"Notes. {question} The Avon.", PROSE + " Again."]))
    cfg = config([source], decontaminate={"tasks": [f"harness:{tmp_path / 'theirs.yaml'}"]})
    manifest = prepare_dataset(cfg, tmp_path / "ds").manifest
    assert manifest["documents"]["dropped"] == {"contaminated": 1}
    audit = json.loads((tmp_path / "ds" / "audit.jsonl").read_text())
    assert (audit["doc"], audit["item"]) == (f"{source}:2", "theirs item 1")


def test_a_harness_task_whose_data_is_not_on_disk_is_one_line(tmp_path: Path) -> None:
    pytest.importorskip("lm_eval")
    source = write_jsonl(tmp_path / "a.jsonl", [PROSE])
    result = run_cli(
        "data-prep", source, "--out", tmp_path / "ds", "--set", "data.decontaminate.tasks=[harness:arc_easy]"
    )
    assert_user_error(result, "harness:arc_easy: the task's data is not on disk")


def test_mixing_weights_are_honored_exactly_in_the_packed_order(tmp_path: Path) -> None:
    alpha = write_jsonl(tmp_path / "alpha.jsonl", [f"alpha document number {i} about rivers." for i in range(40)])
    beta = write_jsonl(tmp_path / "beta.jsonl", [f"beta document number {i} about mills." for i in range(30)])
    cfg = config([str(alpha), str(beta)], mix={str(alpha): 2.0, str(beta): 0.5}, val_fraction=0)
    manifest = prepare_dataset(cfg, tmp_path / "ds").manifest
    assert [(m["documents"], m["documents_packed"]) for m in manifest["mix"]] == [(40, 80), (30, 15)]
    order = [doc.split()[0] for doc in documents(tmp_path / "ds") if doc]
    assert 94 <= len(order) <= 95  # the last document may be cut off with the final partial block
    assert order.count("alpha") in (79, 80) and order.count("beta") in (14, 15)
    betas = [i for i, name in enumerate(order) if name == "beta"]
    assert max(b - a for a, b in zip(betas, betas[1:], strict=False)) <= 7  # spread evenly, one in every 6.3
    every_other = sorted(int(doc.split()[3]) for doc in documents(tmp_path / "ds") if doc.startswith("beta"))
    assert every_other[:5] == [1, 3, 5, 7, 9]
    twice = [doc for doc in documents(tmp_path / "ds") if doc.startswith("alpha document number 7 ")]
    assert len(twice) == 2


def test_mix_naming_no_source_is_one_line(tmp_path: Path) -> None:
    source = write_jsonl(tmp_path / "a.jsonl", [PROSE])
    result = run_cli("data-prep", source, "--out", tmp_path / "ds", "--set", "data.mix={b.jsonl: 2}")
    assert_user_error(result, "mix names 'b.jsonl', which is not one of data.sources")


def shard_files(tmp_path: Path, shards: int = 6) -> list[str]:
    planted = planted_corpus(originals=300, seed=5)
    per = len(planted.texts) // shards
    return [
        str(write_jsonl(tmp_path / f"part-{i}.jsonl", planted.texts[i * per : (i + 1) * per])) for i in range(shards)
    ]


def dataset_bytes(path: Path) -> dict[str, bytes]:
    files = {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}
    manifest = json.loads(files.pop("manifest.json"))
    manifest.pop("created")
    return {**files, "manifest": json.dumps(manifest).encode()}


def test_two_worker_processes_write_the_same_bytes_and_a_killed_run_resumes(tmp_path: Path) -> None:
    parts = shard_files(tmp_path)
    settings = ["--set", "data.near_dedup.enabled=true", "--vocab-size", "400", "--block-size", "16"]
    for workers, out in ((1, "one"), (2, "two")):
        result = run_cli("data-prep", *parts, "--out", tmp_path / out, *settings, "--set", f"data.workers={workers}")
        assert result.exit_code == 0, result.stderr
    assert dataset_bytes(tmp_path / "one") == dataset_bytes(tmp_path / "two")

    # SIGKILL to the job's process group (as a scheduler's preemption or a closed terminal does) once two shards are
    # done: the run again resumes from them and writes the same bytes
    command = [sys.executable, "-m", "llmkit", "data-prep", *parts, "--out", str(tmp_path / "again"), *settings]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 120
    while not list(tmp_path.glob(".again.work-*/logs/shards/completions/00001")):
        assert process.poll() is None and time.monotonic() < deadline, "data-prep ended before it could be killed"
        time.sleep(0.01)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    assert not (tmp_path / "again").exists()
    result = run_cli("data-prep", *parts, "--out", tmp_path / "again", *settings)
    assert result.exit_code == 0, result.stderr
    resumed = int(result.stdout.split("resumed")[1].split()[0])
    assert 2 <= resumed < len(parts)
    assert dataset_bytes(tmp_path / "again") == dataset_bytes(tmp_path / "one")
    assert not list(tmp_path.glob(".again.*"))  # the work directory goes once the dataset is in place


@pytest.mark.parametrize(
    ("setting", "fragment"),
    [
        ("data.decontaminate.tasks=[missing.jsonl]", "missing.jsonl: data.decontaminate.tasks names a file"),
        ("data.near_dedup.threshold=1.5", "threshold"),
    ],
    ids=["missing decontamination file", "near-dedup threshold out of range"],
)
def test_curation_settings_are_checked_in_one_line(tmp_path: Path, setting: str, fragment: str) -> None:
    source = write_jsonl(tmp_path / "a.jsonl", [PROSE])
    assert_user_error(run_cli("data-prep", source, "--out", tmp_path / "ds", "--set", setting), fragment)


def test_a_ray_cluster_writes_the_same_bytes_as_one_process(tmp_path: Path) -> None:
    pytest.importorskip("ray", reason="Ray is in the ray extra (make test installs it)")
    parts = shard_files(tmp_path)
    settings = ["--set", "data.near_dedup.enabled=true", "--vocab-size", "400", "--block-size", "16"]
    assert run_cli("data-prep", *parts, "--out", tmp_path / "local", *settings).exit_code == 0
    ray = ["--set", "data.executor=ray", "--set", "data.workers=2"]
    result = run_cli("data-prep", *parts, "--out", tmp_path / "ray", *settings, *ray)
    assert result.exit_code == 0, result.stderr
    assert dataset_bytes(tmp_path / "ray") == dataset_bytes(tmp_path / "local")
