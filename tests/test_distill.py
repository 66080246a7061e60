"""Distillation (llmkit.train.distill): the divergences against TRL's, the top-k cache's bound, pretraining and
fine-tuning with a teacher (live and cached), exact resume with the cache, reuse of a cache by a later run, and the
one-line refusals. The proof that distillation teaches (a student beating the same student trained on data alone,
on the built-in corpus whose entropy floor is known) is bench/distill_proof.py; its table is in
docs/compression.md."""

from __future__ import annotations

import json
import signal
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from llmkit.atomic import file_sha256
from llmkit.config import DistillConfig
from llmkit.data.corpus import color_chats
from llmkit.train.distill import cache_bytes, token_divergence
from tests.conftest import TINY_MODEL, assert_nothing_written, assert_user_error, run_cli
from tests.test_resume import assert_same_run, llmkit_subprocess

STUDENT = [*TINY_MODEL, "--set", "model.n_layers=1"]


def test_divergences_equal_trls_generalized_jsd(monkeypatch) -> None:
    monkeypatch.setenv("TRL_EXPERIMENTAL_SILENCE", "1")
    from trl.experimental.gkd import GKDTrainer

    torch.manual_seed(0)
    student, teacher = torch.randn(2, 6, 11) * 3, torch.randn(2, 6, 11) * 3
    labels = torch.tensor([[1, 2, -100, 4, 5, 6], [-100, -100, 3, 3, 2, 1]])
    keep = labels != -100
    for loss, beta, trl_beta in [("forward_kl", 0.5, 0.0), ("reverse_kl", 0.5, 1.0), ("jsd", 0.5, 0.5),
                                 ("jsd", 0.2, 0.2)]:  # fmt: skip
        cfg = DistillConfig(loss=loss, beta=beta, temperature=2.0)
        ours = token_divergence(student[keep], {"logits": teacher[keep]}, cfg, vocab=11)
        theirs = GKDTrainer.generalized_jsd_loss(student, teacher, labels, beta=trl_beta, temperature=2.0,
                                                 reduction="sum")  # fmt: skip
        assert torch.allclose(ours, theirs, rtol=1e-5, atol=1e-6), (loss, beta, float(ours), float(theirs))


def test_a_top_k_cache_of_every_token_is_exact_and_fewer_never_exceed_the_full_divergence() -> None:
    torch.manual_seed(1)
    student, teacher = torch.randn(40, 13) * 2, torch.randn(40, 13) * 2
    for loss in ("forward_kl", "reverse_kl", "jsd"):
        cfg = DistillConfig(loss=loss)
        full = token_divergence(student, {"logits": teacher}, cfg, vocab=13)
        for k in (13, 5, 1):
            top = torch.topk(torch.log_softmax(teacher, -1), k, dim=-1)
            cached = token_divergence(student, {"topk_ids": top.indices, "topk_logp": top.values}, cfg, vocab=13)
            if k == 13:
                assert torch.allclose(cached, full, rtol=1e-4), (loss, float(cached), float(full))
            else:
                assert float(cached) <= float(full) + 1e-5 and float(cached) > 0, (loss, k)


def distill_args(data: Path, out: Path, teacher: Path, *extra: str, steps: int = 12) -> list[str]:
    return [
        "--data", str(data), "--out", str(out), "--max-steps", str(steps), "--micro-batch-size", "4", "--lr", "3e-3",
        *STUDENT, "--teacher", str(teacher), "--set", "train.grad_accum_steps=2", "--set", "train.eval_every=4",
        "--set", "train.eval_batches=2", "--set", "logging.every_steps=1", "--set", "checkpoint.every_steps=4",
        "--set", "checkpoint.keep_last=10", "--set", "logging.data_trace=true", "--set", "logging.report_to=[]",
        "--set", "logging.plot=false", "--set", "schedule.warmup_steps=2", *extra,
    ]  # fmt: skip


@pytest.fixture(scope="module")
def cached_reference(tiny_dataset: Path, tiny_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("distill") / "reference"
    result = run_cli("pretrain", *distill_args(tiny_dataset, out, tiny_run, "--set", "distill.top_k=8"))
    assert result.exit_code == 0, result.stderr + result.stdout
    return out


def test_pretraining_from_a_cached_teacher_resumes_bitwise_and_the_cache_is_reused(
    cached_reference: Path, tiny_dataset: Path, tiny_run: Path, tmp_path: Path
) -> None:
    cache = cached_reference / "teacher_cache"
    manifest = json.loads((cache / "manifest.json").read_text())
    blocks = json.loads((tiny_dataset / "manifest.json").read_text())["splits"]["train"]
    assert manifest["tokens"] == blocks["blocks"] * 32 and manifest["key"]["k"] == 8
    assert (cache / "ids.npy").stat().st_size + (cache / "logp.npy").stat().st_size >= cache_bytes(
        manifest["tokens"], 8, manifest["key"]["vocab"]
    )
    assert "val_loss" in json.loads((cached_reference / "metrics.jsonl").read_text().splitlines()[-1])

    run = tmp_path / "killed"
    args = distill_args(tiny_dataset, run, tiny_run, "--set", "distill.top_k=8")
    proc = llmkit_subprocess("pretrain", *args, env={"LLMKIT_FAULT_INJECT": "kill@6.1"})
    proc.wait(timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.read() if proc.stderr else ""
    written = {name: file_sha256(run / "teacher_cache" / name) for name in ("ids.npy", "logp.npy")}
    assert written == {name: file_sha256(cache / name) for name in written}  # the same teacher, the same numbers
    resumed = run_cli("pretrain", *args, "--resume", "auto")
    assert resumed.exit_code == 0, resumed.stderr
    assert "teacher cache: reusing" in resumed.stdout
    assert written == {name: file_sha256(run / "teacher_cache" / name) for name in written}  # read, not rewritten
    assert_same_run(run, cached_reference)

    reuse = tmp_path / "reuse"
    result = run_cli("pretrain", *distill_args(tiny_dataset, reuse, tiny_run, "--set", "distill.top_k=8",
                                               "--set", f"distill.cache={cache}"))  # fmt: skip
    assert result.exit_code == 0 and f"teacher cache: reusing {cache}" in result.stdout, result.stderr
    assert not (reuse / "teacher_cache").exists()
    final, expected = load_file(reuse / "final" / "model.safetensors"), load_file(run / "final" / "model.safetensors")
    assert all(torch.equal(final[name], expected[name]) for name in expected)

    other = tmp_path / "other"
    refused = run_cli("pretrain", *distill_args(tiny_dataset, other, tiny_run, "--set", "distill.top_k=4",
                                                "--set", f"distill.cache={cache}"))  # fmt: skip
    assert_user_error(refused, str(cache), "another setting (k differ)")
    assert_nothing_written(tmp_path, "other")


def test_pretraining_with_a_live_teacher_reports_the_divergence_and_the_data_loss(
    tiny_dataset: Path, tiny_run: Path, tmp_path: Path
) -> None:
    out = tmp_path / "jsd"
    result = run_cli("pretrain", *distill_args(tiny_dataset, out, tiny_run, "--set", "distill.loss=jsd",
                                               "--set", "distill.alpha=0.5", steps=8))  # fmt: skip
    assert result.exit_code == 0, result.stderr
    evaluations = [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "val_jsd" in r]
    assert [r["step"] for r in evaluations] == [4, 8]
    assert 0 < evaluations[-1]["val_jsd"] < evaluations[0]["val_jsd"]  # the student moves toward the teacher
    assert evaluations[-1]["val_loss"] < evaluations[0]["val_loss"]
    assert not (out / "teacher_cache").exists()


@pytest.fixture(scope="module")
def chats(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("distill_sft") / "chat.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in color_chats(120, 0)))
    return path


def ft_args(model: Path, data: Path, out: Path, *extra: str, steps: int = 8) -> list[str]:
    return ["finetune", "--model", str(model), "--data", str(data), "--out", str(out), "--max-steps", str(steps),
            "--micro-batch-size", "4", "--max-length", "64", "--lr", "3e-3", "--set", "train.eval_every=4",
            "--set", "train.eval_batches=2", "--set", "logging.plot=false", *extra]  # fmt: skip


@pytest.fixture(scope="module")
def sft_teacher(tiny_run: Path, chats: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A LoRA fine-tune: as a teacher it is its base with the adapter merged; its tokenizer has the chat template's
    tokens, which the student's tokenizer gets when it is fine-tuned with the same template."""
    teacher = tmp_path_factory.mktemp("distill_teacher") / "teacher"
    result = run_cli(*ft_args(tiny_run, chats, teacher, "--method", "lora", steps=6))
    assert result.exit_code == 0, result.stderr
    return teacher


def test_finetuning_distills_sft_rows_from_a_lora_teacher_live_and_cached(
    tiny_run: Path, chats: Path, sft_teacher: Path, tmp_path: Path
) -> None:
    teacher = sft_teacher

    live = run_cli(*ft_args(tiny_run, chats, tmp_path / "live", "--task", "distill", "--teacher", str(teacher)))
    assert live.exit_code == 0, live.stderr
    assert f"teacher {teacher}" in live.stdout
    records = [json.loads(line) for line in (tmp_path / "live" / "metrics.jsonl").read_text().splitlines()]
    kl = [r["val_forward_kl"] for r in records if "val_forward_kl" in r]
    assert len(kl) == 2 and 0 < kl[1] < kl[0]

    cached = run_cli(*ft_args(tiny_run, chats, tmp_path / "cached", "--task", "distill", "--teacher", str(teacher),
                              "--method", "lora", "--set", "distill.top_k=4"))  # fmt: skip
    assert cached.exit_code == 0, cached.stderr
    stats = json.loads((tmp_path / "cached" / "data_stats.json").read_text())
    manifest = json.loads((tmp_path / "cached" / "teacher_cache" / "manifest.json").read_text())
    assert manifest["samples"] == stats["train_examples"] and manifest["key"]["k"] == 4
    assert (tmp_path / "cached" / "final" / "adapter_model.safetensors").is_file()


def test_distillation_refuses_bad_input_in_one_line(tiny_run: Path, tiny_dataset: Path, chats: Path,
                                                    tmp_path: Path) -> None:  # fmt: skip
    no_teacher = run_cli(*ft_args(tiny_run, chats, tmp_path / "a", "--task", "distill"))
    assert_user_error(no_teacher, "--task distill needs a teacher", "--teacher")
    wrong_task = run_cli(*ft_args(tiny_run, chats, tmp_path / "b", "--teacher", str(tiny_run)))
    assert_user_error(wrong_task, "--teacher and distill.* are for --task distill")
    # the chat template adds tokens to the student's tokenizer that the pretrained teacher's lacks
    vocab = run_cli(*ft_args(tiny_run, chats, tmp_path / "c", "--task", "distill", "--teacher", str(tiny_run)))
    assert_user_error(vocab, f"teacher {tiny_run}", "different vocabularies", "tokens vs")
    missing = run_cli("pretrain", *distill_args(tiny_dataset, tmp_path / "d", tmp_path / "nowhere"))
    assert_user_error(missing, "nowhere", "model not found")
    for name in "abcd":
        assert_nothing_written(tmp_path, name)


def test_on_policy_rows_are_the_students_own_answers_to_the_same_prompts(tiny_run: Path, chats: Path) -> None:
    from transformers import AutoModelForCausalLM

    from llmkit.config import load_config
    from llmkit.data.readers import resolve_sources
    from llmkit.data.templates import encode_example, setup_chat_template
    from llmkit.data.tokenizer import load_tokenizer
    from llmkit.losses import IGNORE
    from llmkit.train.distill import OnPolicy
    from llmkit.train.packing import collate_rows
    from llmkit.train.tasks.base import read_examples

    tokenizer = load_tokenizer(tiny_run / "final")
    chat = setup_chat_template(tokenizer, "chatml")
    examples, _ = read_examples(resolve_sources([str(chats)]), "auto", {})
    encoded = [encode_example(tokenizer, e, 64, False) for e in examples[:6]]
    model = AutoModelForCausalLM.from_pretrained(tiny_run / "final")
    model.resize_token_embeddings(len(tokenizer) + 64)
    accelerator = type("Acc", (), {"process_index": 0, "device": torch.device("cpu"),
                                   "unwrap_model": staticmethod(lambda m: m)})()  # fmt: skip
    cfg = load_config(None, ["distill.on_policy=1.0"])
    rewrite = OnPolicy(cfg, encoded, tokenizer, list(chat.stop_token_ids), 64, "sdpa", accelerator)
    batch = collate_rows([[e] for e in encoded[:4]], int(tokenizer.pad_token_id), "sdpa", [0, 1, 2, 3])
    new = rewrite(model, batch, step=3, micro=0)
    assert "on_policy" in new and sorted(new["sample_indices"].tolist()) == [0, 1, 2, 3]
    again = rewrite(model, batch, step=3, micro=0)
    assert torch.equal(new["input_ids"], again["input_ids"])  # the same draw for the same step: exact resume
    for row in range(new["input_ids"].shape[0]):
        labels, ids = new["labels"][row], new["input_ids"][row]
        trained = (labels != IGNORE).nonzero().flatten()
        assert len(trained) > 0 and torch.equal(labels[trained], ids[trained])  # targets are its own tokens
    original = encoded[0]
    start = int((original.labels != IGNORE).nonzero()[0][0])
    sample = rewrite._sample([original, encoded[1]], model)[0]
    assert (sample.ids[:start] == original.ids[:start]).all()  # the row's own prompt, its first assistant turn
    assert (sample.labels[:start] == IGNORE).all() and (sample.labels[start:] == sample.ids[start:]).all()
    assert len(sample.ids) <= len(original.ids)  # no longer than the data's answer
    off = OnPolicy(load_config(None, ["distill.on_policy=0"]), encoded, tokenizer, [0], 64, "sdpa", accelerator)
    assert off(model, batch, step=3, micro=0) is batch


def test_on_policy_distillation_resumes_bitwise_after_a_kill(
    tiny_run: Path, chats: Path, sft_teacher: Path, tmp_path: Path
) -> None:
    extra = ["--task", "distill", "--teacher", str(sft_teacher), "--set", "distill.on_policy=0.5", "--set",
             "distill.loss=jsd", "--set", "train.grad_accum_steps=2", "--set", "checkpoint.every_steps=2",
             "--set", "checkpoint.keep_last=10", "--set", "logging.data_trace=true", "--set", "logging.every_steps=1",
             "--set", "logging.report_to=[]"]  # fmt: skip
    reference = tmp_path / "reference"
    result = run_cli(*ft_args(tiny_run, chats, reference, *extra, steps=6))
    assert result.exit_code == 0, result.stderr
    run = tmp_path / "killed"
    proc = llmkit_subprocess(*ft_args(tiny_run, chats, run, *extra, steps=6), env={"LLMKIT_FAULT_INJECT": "kill@4.1"})
    proc.wait(timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.read() if proc.stderr else ""
    resumed = run_cli(*ft_args(tiny_run, chats, run, *extra, steps=6), "--resume", "auto")
    assert resumed.exit_code == 0, resumed.stderr
    assert_same_run(run, reference)
    refused = run_cli(*ft_args(tiny_run, chats, tmp_path / "x", *extra, "--set", "distill.top_k=4"))
    assert_user_error(refused, "distill.on_policy needs the live teacher")
