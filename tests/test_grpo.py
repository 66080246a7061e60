"""`--task grpo`: the loss equals TRL's, the reward rises on a checkable objective, a killed run resumes to the
bits, and bad rewards are one line."""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import assert_nothing_written, assert_user_error, pretrained, run_cli

NAMES = ["Tom", "Mia", "Sam", "Lily", "Ben", "Anna", "Max", "Zoe"]
TASK_FILE = """
name: word
kind: generation
prompt: "Once upon a time, {name} saw a"
answer_field: word
match: contains
max_new_tokens: 6
"""
REWARD_MODULE = """
def has_word(prompt, answer, row):
    return 1.0 if row["word"] in answer.lower() else 0.0

def broken(prompt, answer, row):
    return {"not": "a number"}
"""


@pytest.fixture()
def prompts(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Rows with fields only (the task file renders them), a task file, and a reward module in the working dir."""
    rows = [{"name": NAMES[i % len(NAMES)], "word": "the"} for i in range(48)]
    (tmp_path / "prompts.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    (tmp_path / "word.yaml").write_text(TASK_FILE.replace("name: word\n", "name: word\ndata: prompts.jsonl\n"))
    (tmp_path / "rewards_for_test.py").write_text(REWARD_MODULE)
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    return tmp_path


ADAPTER = "adapter_model.safetensors"


def killed_then_resumed(args: list[str], at: str) -> None:
    """`llmkit ARGS` killed (SIGKILL) at step.micro-batch `at`, then resumed with --resume auto to its end."""
    env = {**os.environ, "LLMKIT_FAULT_INJECT": f"kill@{at}", "PYTHONWARNINGS": "ignore"}
    killed = subprocess.run([sys.executable, "-m", "llmkit", *args], env=env, capture_output=True, timeout=300)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    resumed = run_cli(*args, "--resume", "auto")
    assert resumed.exit_code == 0, resumed.stderr


def assert_same_weights(saved: Path, expected: Path) -> None:
    """Two safetensors files hold the same tensors, to the bit."""
    a, b = load_file(saved), load_file(expected)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def grpo_args(model: Path, work: Path, out: Path, *extra: str, steps: int = 8) -> list[str]:
    return ["finetune", "--model", str(model), "--data", str(work / "prompts.jsonl"), "--out", str(out),
            "--task", "grpo", "--reward", str(work / "word.yaml"), "--max-steps", str(steps), "--max-length", "48",
            "--micro-batch-size", "2", "--lr", "3e-3", "--method", "lora", "--set", "finetune.grpo.generations=4",
            "--set", "finetune.grpo.max_new_tokens=6", "--set", "logging.every_steps=2", "--set", "train.eval_every=4",
            "--set", "train.eval_batches=2", *extra]  # fmt: skip


@pytest.mark.parametrize(
    ("loss", "beta", "again", "vllm"),
    [("grpo", 0.0, False, None), ("grpo", 0.04, False, None), ("dr_grpo", 0.0, False, None),
     ("dapo", 0.1, False, None), ("grpo", 0.04, True, None), ("dapo", 0.0, True, None),
     ("grpo", 0.04, False, "sequence_mask"), ("dapo", 0.1, True, "token_truncate"),
     ("dr_grpo", 0.0, False, "token_mask"), ("grpo", 0.0, True, "sequence_truncate")],
)  # fmt: skip
def test_the_loss_and_its_gradient_equal_trls(
    tiny_run: Path, tmp_path: Path, loss: str, beta: float, again: bool, vllm: str | None
) -> None:
    """TRL's GRPOTrainer._compute_loss and llmkit's on the same answers and advantages (a KL to a perturbed
    reference where beta > 0; `again`: a step that learns from answers sampled before the last update, whose
    ratio to the sampling log-probs is clipped; `vllm`: answers drawn by vLLM with log-probs of its own, weighed
    by that correction, TRL's importance weights computed here as its sampling step does): equal within 1e-5, and
    so are the gradients of every weight and the share of tokens where the clip binds."""
    trl = pytest.importorskip("trl")
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from llmkit.train.tasks.grpo import answer_rows, group_advantages, loss_normalizer, surrogate_loss, token_logps

    source = tiny_run / "final"
    models = [AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32) for _ in range(3)]
    ours, reference = models[1], models[2]
    with torch.no_grad():
        for parameter in reference.parameters():
            parameter.add_(0.2 * torch.randn_like(parameter))
    generations, prompts, longest = 4, 2, 6
    args = trl.GRPOConfig(output_dir=str(tmp_path / "trl"), per_device_train_batch_size=8, num_generations=4,
                          loss_type=loss, beta=beta, max_completion_length=longest, report_to=[], use_cpu=True,
                          bf16=False, epsilon_high=0.28 if loss == "dapo" else None)  # fmt: skip
    trainer = trl.GRPOTrainer(model=models[0], reward_funcs=[lambda completions, **_: [0.0] * len(completions)],
                              args=args, train_dataset=Dataset.from_dict({"prompt": ["a"] * 8}),
                              processing_class=AutoTokenizer.from_pretrained(source))  # fmt: skip
    generator = torch.Generator().manual_seed(1)
    prompt_ids = torch.randint(5, 200, (prompts, 5), generator=generator).repeat_interleave(generations, 0)
    lengths = [6, 3, 4, 6, 2, 5, 6, 1]
    mask = (torch.arange(longest) < torch.tensor(lengths)[:, None]).long()
    completions = torch.randint(5, 200, (prompts * generations, longest), generator=generator) * mask
    rewards = np.array([1.0, 0.0, 0.0, 1.0, 0.5, 0.2, 0.9, 0.1])
    advantages = torch.tensor(group_advantages(rewards, generations, loss), dtype=torch.float32)
    inputs = {"prompt_ids": prompt_ids, "prompt_mask": torch.ones_like(prompt_ids), "completion_ids": completions,
              "completion_mask": mask, "advantages": advantages, "old_per_token_logps": None,
              "num_items_in_batch": mask.sum()}  # fmt: skip
    answers = [c[:n].numpy() for c, n in zip(completions, lengths, strict=True)]
    batch = answer_rows([p.numpy() for p in prompt_ids], answers, advantages.numpy(), 0, loss)
    if beta:
        with torch.no_grad():
            whole = torch.cat([prompt_ids, completions], 1)
            logits = reference(input_ids=whole, attention_mask=torch.cat([inputs["prompt_mask"], mask], 1)).logits
            inputs["ref_per_token_logps"] = torch.log_softmax(logits[:, 4:-1], -1).gather(-1, completions[..., None])[
                ..., 0
            ]
            batch["ref_logps"] = token_logps(reference(input_ids=batch["input_ids"]).logits, batch["labels"])
    if again:  # the sampling policy's log-probs: this model's, moved by up to +-0.5 (past the clip either side)
        with torch.no_grad():
            now = token_logps(ours(input_ids=batch["input_ids"]).logits, batch["labels"])
        batch["old_logps"] = now + (torch.rand(now.shape, generator=generator) - 0.5)
        inputs["old_per_token_logps"] = torch.stack([batch["old_logps"][i, 4 : 4 + longest] for i in range(8)]) * mask
    settings = SimpleNamespace(temperature=1.0, epsilon=0.2, beta=beta, vllm_correction=vllm,
                               vllm_correction_min=0.5 if vllm and vllm.endswith("truncate") else None,
                               vllm_correction_max=1.2)  # fmt: skip
    outside = 0
    if vllm:  # vLLM's log-probs: the policy's at sampling, moved by up to +-0.4 (some weights past the bounds)
        with torch.no_grad():
            policy = batch.get("old_logps", token_logps(ours(input_ids=batch["input_ids"]).logits, batch["labels"]))
        drawn = policy + 0.8 * (torch.rand(policy.shape, generator=generator) - 0.5)
        sampled = [drawn[i, 4 : 4 + n].numpy() for i, n in enumerate(lengths)]
        batch = answer_rows([p.numpy() for p in prompt_ids], answers, advantages.numpy(), 0, loss, sampled)
        if again:
            batch["old_logps"] = policy
        gap = torch.stack([policy[i, 4 : 4 + longest] - drawn[i, 4 : 4 + longest] for i in range(8)]) * mask
        ratio = torch.exp(gap.sum(-1, keepdim=True) if vllm.startswith("sequence") else gap)  # TRL's, as it does
        low, high = settings.vllm_correction_min or 0.0, settings.vllm_correction_max
        outside = int((((ratio < low) | (ratio > high)).expand_as(mask) & mask.bool()).sum())
        inputs["importance_sampling_ratio"] = (
            ratio.masked_fill((ratio < low) | (ratio > high), 0.0) if vllm.endswith("mask") else ratio.clamp(low, high)
        )
        trainer.use_vllm, trainer.vllm_importance_sampling_correction = True, True
        if beta:
            batch["ref_logps"] = token_logps(reference(input_ids=batch["input_ids"]).logits, batch["labels"]).detach()
    trainer.model.train()
    trainer.current_gradient_accumulation_steps = 1
    theirs = trainer._compute_loss(trainer.model, inputs)
    theirs.backward()
    out = surrogate_loss(ours(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits,
                         batch, settings, 0.28 if loss == "dapo" else None)  # fmt: skip
    total, trained, clipped = out.total, out.trained, out.clipped
    mine = total / loss_normalizer(batch, loss, longest)
    mine.backward()
    assert abs(mine.item() - theirs.item()) <= 1e-5 * max(1.0, abs(theirs.item()))
    assert float(clipped / trained) == pytest.approx(trainer._metrics["train"]["clip_ratio/region_mean"][-1])
    assert (float(clipped) > 0) == again
    if vllm:  # some weights were past their bounds, and the figures say how many tokens they weigh
        assert out.bound is not None and int(out.bound) == outside > 0
    for (name, a), b in zip(trainer.model.named_parameters(), ours.parameters(), strict=True):
        torch.testing.assert_close(b.grad, a.grad, atol=1e-5, rtol=1e-4, msg=lambda m, n=name: f"{n}: {m}")


@pytest.mark.parametrize("mode", ["sequence_mask", "sequence_truncate", "token_mask", "token_truncate"])
def test_vllms_weight_inside_a_compiled_graph_gives_the_eager_loss_and_gradient(mode: str) -> None:
    """What a GPU user gets with engine vllm: the loss, its importance weight and its figures traced whole into a
    compiled training step (no graph break) on bf16 logits, equal to eager, gradient included; make test has no
    vLLM, so the weight is fed log-probs as vLLM returns them (the policy's, moved)."""
    from llmkit.train.tasks.grpo import answer_rows, surrogate_loss, token_logps

    generator = torch.Generator().manual_seed(5)
    prompts = [np.array([5, 6, 7]), np.array([8, 9])] * 2
    answers = [np.array([10, 11, 12, 13]), np.array([14]), np.array([15, 16]), np.array([17, 18, 19])]
    logits = torch.randn(4, 7, 32, generator=generator).to(torch.bfloat16)
    batch = answer_rows(prompts, answers, np.array([1.0, -1.0, 0.5, -0.5]), 0, "dapo")
    policy = token_logps(logits, batch["labels"])
    drawn = [policy[i, len(p) - 1 : len(p) - 1 + len(a)] + 0.6 * (torch.rand(len(a), generator=generator) - 0.5)
             for i, (p, a) in enumerate(zip(prompts, answers, strict=True))]  # fmt: skip
    batch = answer_rows(prompts, answers, np.array([1.0, -1.0, 0.5, -0.5]), 0, "dapo", [d.numpy() for d in drawn])
    settings = SimpleNamespace(temperature=1.0, epsilon=0.2, beta=0.0, vllm_correction=mode,
                               vllm_correction_min=0.9 if mode.endswith("truncate") else None,
                               vllm_correction_max=1.1)  # fmt: skip

    def loss(values: torch.Tensor) -> tuple[torch.Tensor, ...]:
        out = surrogate_loss(values, batch, settings, None)
        return out.total, out.gap, out.bound

    results = []
    for run in (loss, torch.compile(loss, backend="aot_eager", fullgraph=True)):
        leaf = logits.clone().requires_grad_()
        total, gap, bound = run(leaf)
        total.backward()
        results.append((total.detach(), gap, bound, leaf.grad))
    (total, gap, bound, grad), compiled = results
    assert 0 < int(bound) < 10  # some weights past their bounds, not all
    for got, want in zip(compiled, (total, gap, bound, grad), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_advantages_compare_each_answer_with_its_group() -> None:
    from llmkit.train.tasks.grpo import group_advantages

    rewards = np.array([1.0, 0.0, 0.0, 1.0, 2.0, 2.0, 2.0, 2.0])
    grpo = group_advantages(rewards, 4, "grpo")
    np.testing.assert_allclose(grpo[:4], (rewards[:4] - 0.5) / (np.std(rewards[:4], ddof=1) + 1e-4))
    assert np.all(grpo[4:] == 0)  # a group whose answers all scored the same teaches nothing
    np.testing.assert_allclose(group_advantages(rewards, 4, "dr_grpo")[:4], rewards[:4] - 0.5)
    np.testing.assert_allclose(group_advantages(rewards, 4, "rloo")[:4], [2 / 3, -2 / 3, -2 / 3, 2 / 3])


def test_grpo_raises_the_reward_of_a_checkable_answer(tiny_run: Path, prompts: Path, tmp_path: Path) -> None:
    """Rewarded by a task file (and a Python function, weighted), the held-out reward rises; the run's adapter
    loads in plain peft and `llmkit eval` gates it with the same task file."""
    out = tmp_path / "run"
    result = run_cli(*grpo_args(tiny_run, prompts, out, "--reward", "rewards_for_test:has_word@0.5",
                                "--set", "finetune.grpo.beta=0.02", steps=24))  # fmt: skip
    assert result.exit_code == 0, result.stderr + result.stdout
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if "reward" in r]
    val = [r for r in records if "val_reward" in r]
    for key in ("reward_std", "same_reward_share", "kl", "answer_tokens_mean", "reward_word"):
        assert key in train[-1], key
    assert train[-1]["sample_tokens_per_s"] > 0 and train[-1]["train_tokens_per_s"] > 0
    assert train[-1]["reward_word"] == pytest.approx(train[-1]["reward_has_word"])  # the same check, twice
    right = train[-1]["reward_has_word"]  # each answer's 0 or 1: the spread of a share
    assert train[-1]["reward_has_word_std"] == pytest.approx(math.sqrt(right * (1 - right)), abs=1e-9)
    assert train[-1]["reward"] == pytest.approx(1.5 * train[-1]["reward_word"])  # weights 1 and 0.5
    assert max(r["reward"] for r in train[-3:]) > train[0]["reward"] + 0.2
    assert not [r for r in records if "loss_spike" in r]  # a signed surrogate near 0 has no spikes to report
    assert val[-1]["val_reward"] > val[0]["val_reward"] or val[0]["val_reward"] == 1.5
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_run / "final"), out / "final")
    report = tmp_path / "eval.json"
    gate = run_cli("eval", out, "--tasks", prompts / "word.yaml", "--report", report)
    assert gate.exit_code in (0, 1), gate.stderr
    assert "word.contains" in json.loads(report.read_text())["metrics"]


@pytest.mark.slow
def test_a_killed_grpo_run_resumes_bitwise(tiny_run: Path, prompts: Path, tmp_path: Path) -> None:
    """Killed after sampling, inside an accumulation window: the resumed run samples the same answers and ends
    with the uninterrupted run's weights to the bit."""
    extra = ["--set", "train.grad_accum_steps=2", "--set", "checkpoint.every_steps=2"]
    reference = run_cli(*grpo_args(tiny_run, prompts, tmp_path / "ref", *extra, steps=6))
    assert reference.exit_code == 0, reference.stderr
    args = grpo_args(tiny_run, prompts, tmp_path / "run", *extra, steps=6)
    killed_then_resumed(args, at="3.0")
    assert_same_weights(tmp_path / "run" / "final" / ADAPTER, tmp_path / "ref" / "final" / ADAPTER)


def test_each_sample_is_learned_from_again_and_a_round_resumes(tiny_run: Path, prompts: Path, tmp_path: Path) -> None:
    """num_iterations=2: prompts are read every other step, the steps between learn from the kept answers through
    the clipped ratio, and a run killed after a checkpoint inside a round replays the round's answers from it and
    ends with the uninterrupted run's weights to the bit."""
    extra = ["--set", "finetune.grpo.num_iterations=2", "--set", "checkpoint.every_steps=3",
             "--set", "logging.data_trace=true", "--set", "logging.every_steps=1", "--lr", "2e-2"]  # fmt: skip
    reference = run_cli(*grpo_args(tiny_run, prompts, tmp_path / "ref", *extra, steps=6))
    assert reference.exit_code == 0, reference.stderr
    trace = [json.loads(line) for line in (tmp_path / "ref" / "data_trace.jsonl").read_text().splitlines()]
    assert [r["step"] for r in trace] == [1, 3, 5]  # read once per round
    state = json.loads((tmp_path / "ref" / "checkpoints" / "step-00000006" / "trainer_state.json").read_text())
    assert state["data"]["consumed"] == 3 * 2  # three reads of two prompts: no prompt was skipped
    records = [json.loads(line) for line in (tmp_path / "ref" / "metrics.jsonl").read_text().splitlines()]
    steps = {r["step"]: r for r in records if "clip_fraction" in r}
    assert all("reward" in steps[s] for s in (1, 3, 5)) and not any("reward" in steps[s] for s in (2, 4, 6))
    assert all(steps[s]["clip_fraction"] == 0 for s in (1, 3, 5))  # the sampling step's ratio is 1
    assert any(steps[s]["clip_fraction"] > 0 for s in (2, 4, 6))  # one update later the ratio has moved
    assert (tmp_path / "ref" / "checkpoints" / "step-00000003" / "objective_state.pt").is_file()
    assert not (tmp_path / "ref" / "checkpoints" / "step-00000006" / "objective_state.pt").exists()
    args = grpo_args(tiny_run, prompts, tmp_path / "run", *extra, steps=6)
    killed_then_resumed(args, at="5.0")  # resumes from step 3: step 4 replays the answers sampled at step 3
    assert_same_weights(tmp_path / "run" / "final" / ADAPTER, tmp_path / "ref" / "final" / ADAPTER)
    resumed = [json.loads(line) for line in (tmp_path / "run" / "data_trace.jsonl").read_text().splitlines()]
    assert resumed == trace


def test_bad_rewards_are_one_line(tiny_run: Path, prompts: Path, tmp_path: Path) -> None:
    def grpo(name: str, *extra: str) -> object:
        return run_cli(*grpo_args(tiny_run, prompts, tmp_path / name, *extra, steps=2))

    assert_user_error(grpo("a", "--reward", "rewards_for_test:broken"), "prompts.jsonl:", "rewards_for_test:broken")
    assert_user_error(grpo("b", "--reward", "no_such_module:f"), "no_such_module:f", "cannot import")
    assert_user_error(grpo("c", "--reward", str(prompts / "missing.yaml")), "missing.yaml")
    assert_user_error(grpo("d", "--reward", "word.yaml@heavy"), "the weight after @")
    assert_user_error(grpo("e", "--reward", "word.yaml@nan"), "the weight after @ must be a finite number")
    for name in "abcde":
        assert_nothing_written(tmp_path, name)
    (prompts / "f").mkdir()
    (prompts / "f" / "word.yaml").write_text(TASK_FILE.replace("name: word", "name: word2"))
    weighted = grpo_args(tiny_run, prompts, prompts / "f", "--reward", str(prompts / "f" / "word.yaml@2"), steps=2)
    assert_user_error(run_cli(*weighted), "contains", "word.yaml, which this command reads")  # never an output


def test_compiled_bf16_grpo_saves_an_adapter_plain_peft_loads(tiny_run: Path, prompts: Path, tmp_path: Path) -> None:
    """What a GPU user gets (compiled step, bf16 autocast) with a KL term and steps that learn from kept answers
    again (num_iterations=2): one graph for answers of every length, and the adapter loads in plain peft with every
    key."""
    from tests.gpu_defaults import TRACED, assert_one_graph, clear_compile_counters, plain_load

    clear_compile_counters()
    out = tmp_path / "compiled"
    result = run_cli(*grpo_args(tiny_run, prompts, out, *TRACED, "--set", "finetune.grpo.beta=0.04",
                                "--set", "finetune.lora.dropout=0", "--set", "finetune.grpo.num_iterations=2",
                                "--set", "logging.every_steps=1", steps=4))  # fmt: skip
    assert result.exit_code == 0, result.stderr + result.stdout
    assert_one_graph()
    plain_load(out / "final", base=tiny_run / "final")
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert any("kl" in r for r in records)
    assert [r["step"] for r in records if "clip_fraction" in r and "reward" not in r] == [2, 4]  # the replays


def test_compiled_sampling_draws_the_eager_answers(tiny_run: Path, prompts: Path, tmp_path: Path) -> None:
    """finetune.grpo.compile_sampling (a static KV cache, the decoding step compiled once, prompts padded to one
    width): the same answers as eager sampling, so the run ends with the eager run's weights, and no recompiling
    from step to step."""
    from safetensors.torch import load_file
    from torch._dynamo.utils import counters

    from tests.gpu_defaults import clear_compile_counters

    extra = ["--set", "train.eval_every=1000"]
    eager = run_cli(*grpo_args(tiny_run, prompts, tmp_path / "eager", *extra, steps=4))
    assert eager.exit_code == 0, eager.stderr + eager.stdout
    clear_compile_counters()
    compiled = run_cli(*grpo_args(tiny_run, prompts, tmp_path / "compiled", *extra,
                                  "--set", "finetune.grpo.compile_sampling=true", steps=4))  # fmt: skip
    assert compiled.exit_code == 0, compiled.stderr + compiled.stdout
    assert counters["stats"]["unique_graphs"] >= 1, dict(counters["stats"])  # it did compile
    assert not counters["recompiles"], dict(counters["recompiles"])
    weights = [load_file(tmp_path / run / "final" / "adapter_model.safetensors") for run in ("eager", "compiled")]
    assert weights[0].keys() == weights[1].keys()
    for name, tensor in weights[0].items():
        torch.testing.assert_close(weights[1][name], tensor, rtol=0, atol=0, msg=name)


@pytest.mark.slow
def test_grpo_on_two_processes_resumes_bitwise(tiny_run: Path, prompts: Path, tmp_path: Path) -> None:
    """DDP over gloo: each process samples its own prompts' answers (seeds tied to step, micro-batch and process);
    with num_iterations=2 a run resumed on two processes from its step-3 checkpoint replays each process's kept
    answers at step 4 and ends with the uninterrupted run's weights to the bit. Resumed there on one process, it is
    refused in one line (the round's answers belong to two)."""
    run = tmp_path / "run"
    args = grpo_args(tiny_run, prompts, run, "--set", "checkpoint.every_steps=3", "--set", "logging.every_steps=1",
                     "--set", "finetune.grpo.num_iterations=2", steps=4)  # fmt: skip
    two = ["--cpu", "--num-processes", "2", "--main-process-port", "29541"]
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
    launch = [sys.executable, "-m", "llmkit", *args]
    whole = subprocess.run([*launch, *two], env=env, capture_output=True, text=True, timeout=300)
    assert whole.returncode == 0, whole.stderr[-3000:]
    (run / "final" / ADAPTER).rename(tmp_path / "uninterrupted.safetensors")
    shutil.rmtree(run / "final")
    shutil.rmtree(run / "checkpoints" / "step-00000004")
    resumed = subprocess.run([*launch, *two, "--resume", "auto"], env=env, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming from" in resumed.stdout and "step-00000003" in resumed.stdout
    assert_same_weights(run / "final" / ADAPTER, tmp_path / "uninterrupted.safetensors")
    shutil.rmtree(run / "final")
    shutil.rmtree(run / "checkpoints" / "step-00000004")
    alone = [*launch, "--micro-batch-size", "4", "--resume", "auto"]  # the same global batch
    one = subprocess.run(alone, env=env, capture_output=True, text=True, timeout=300)
    assert one.returncode == 2 and "Traceback" not in one.stderr, one.stderr[-3000:]
    assert "inside a round of finetune.grpo.num_iterations=2" in one.stderr and "on 2 process(es)" in one.stderr


@pytest.mark.slow
def test_full_finetuning_keeps_the_start_as_the_kls_reference(tiny_run: Path, prompts: Path, tmp_path: Path) -> None:
    """With every weight training, the KL's reference is a frozen copy of the start: 0 at the first step, above 0
    once the policy moved; a killed run resumes with the start (not its checkpoint) as the reference, and ends with
    the uninterrupted run's weights to the bit."""
    extra = ["--method", "full", "--set", "finetune.grpo.beta=0.04", "--set", "checkpoint.every_steps=2",
             "--set", "logging.every_steps=1"]  # fmt: skip
    whole = run_cli(*grpo_args(tiny_run, prompts, tmp_path / "ref", *extra, steps=4))
    assert whole.exit_code == 0, whole.stderr + whole.stdout
    kl = [r["kl"] for r in map(json.loads, (tmp_path / "ref" / "metrics.jsonl").read_text().splitlines()) if "kl" in r]
    assert len(kl) == 4 and kl[0] == pytest.approx(0.0, abs=1e-7) and kl[-1] > 1e-6
    args = grpo_args(tiny_run, prompts, tmp_path / "run", *extra, steps=4)
    killed_then_resumed(args, at="3.0")
    assert_same_weights(
        tmp_path / "run" / "final" / "model.safetensors", tmp_path / "ref" / "final" / "model.safetensors"
    )
    from tests.gpu_defaults import TRACED, plain_load  # what a GPU user gets: compiled, bf16; the copy stays eager

    compiled = run_cli(*grpo_args(tiny_run, prompts, tmp_path / "compiled", *extra, *TRACED, steps=2))
    assert compiled.exit_code == 0, compiled.stderr + compiled.stdout
    assert any("kl" in json.loads(line) for line in (tmp_path / "compiled" / "metrics.jsonl").read_text().splitlines())
    plain_load(tmp_path / "compiled" / "final")


@pytest.fixture(scope="module")
def heads_of_32(tiny_dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny run with one head of 32 dimensions (vLLM's CPU attention takes 32 and up); vLLM's tests only."""
    pytest.importorskip("vllm")
    return pretrained(tiny_dataset, tmp_path_factory, "heads-of-32", "model.n_heads=1", "model.n_kv_heads=1")


def test_the_vllm_engine_is_refused_in_one_line_where_it_cannot_run(
    tiny_run: Path, prompts: Path, tmp_path: Path
) -> None:
    """engine vllm is handed whole weights with the adapters added in, on one process: a compiled generate,
    DoRA, a strategy that shards the weights, and (where it is missing) vLLM itself are each one line, before
    anything is written."""
    import importlib.util

    vllm = ["--set", "finetune.grpo.engine=vllm"]
    refusals = [
        (["--set", "finetune.grpo.compile_sampling=true"], "compile_sampling"),
        (["--set", "finetune.lora.dora=true"], "DoRA"),
        (["--strategy", "zero3"], "shards them"),
    ]
    if importlib.util.find_spec("vllm") is None:
        refusals.append(([], "vLLM is not installed here"))
    for extra, fragment in refusals:
        result = run_cli(*grpo_args(tiny_run, prompts, tmp_path / "run", *vllm, *extra))
        assert_user_error(result, fragment)
        assert_nothing_written(tmp_path, "run")


def test_vllm_samples_with_the_weights_being_trained(tmp_path: Path) -> None:
    """Handed a model's weights (tied head and embedding, as llmkit's), and then a LoRA model's (the adapters and
    trained token rows added in out of place), vLLM's greedy answers are the model's own; before, with its dummy
    weights, they are not; the peft model's weights are untouched, and so are the process's threads and random
    state, which vLLM sets for itself."""
    pytest.importorskip("vllm")
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    from llmkit.train.tasks.vllm_sampling import VllmSampler

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64,
                         tie_word_embeddings=True)  # fmt: skip
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():  # sharper logits than at initialization: greedy answers far from ties
        for parameter in model.parameters():
            parameter.mul_(3)
    threads, rng, affinity = torch.get_num_threads(), torch.get_rng_state(), os.sched_getaffinity(0)
    set_threads = torch.set_num_threads
    sampler = VllmSampler(model, 64, torch.float32, 0.3, seed=0)
    # what the training run had is as it was: its threads, cores and random state
    assert torch.get_num_threads() == threads and os.sched_getaffinity(0) == affinity
    assert torch.equal(torch.get_rng_state(), rng) and torch.set_num_threads is set_threads
    prompts = [np.array([5, 17, 33, 8]), np.array([100, 200, 30])]
    greedy = SimpleNamespace(temperature=1.0, top_p=1.0, top_k=1, max_new_tokens=12)

    def assert_answers_are_own(policy: torch.nn.Module) -> list[list[int]]:
        sampler.sync(policy)
        answers = [ids.tolist() for ids, _ in sampler.sample(prompts, 1, 0, greedy, set())]
        for ids, answer in zip(prompts, answers, strict=True):
            own = policy.generate(input_ids=torch.tensor(ids).unsqueeze(0), do_sample=False,
                                  max_new_tokens=12, eos_token_id=None)  # fmt: skip
            assert answer == own[0, len(ids) :].tolist()
        return answers

    dummy = [ids.tolist() for ids, _ in sampler.sample(prompts, 1, 0, greedy, set())]
    plain = assert_answers_are_own(model)
    assert plain != dummy
    rows = list(range(200, 256))  # trained rows of the embedding (and the tied head), as for a chat's added tokens
    lora = LoraConfig(r=4, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=False,
                      trainable_token_indices={"embed_tokens": rows})  # fmt: skip
    policy = get_peft_model(model, lora)
    with torch.no_grad():
        for name, parameter in policy.named_parameters():
            if "trainable_tokens_delta" in name:
                parameter.normal_(0, 0.5)
    before = {name: p.clone() for name, p in policy.named_parameters()}
    assert assert_answers_are_own(policy) != plain
    assert all(torch.equal(p, before[name]) for name, p in policy.named_parameters())
    sampled = SimpleNamespace(temperature=1.5, top_p=1.0, top_k=0, max_new_tokens=8)
    drawn = [sampler.sample(prompts, 3, seed, sampled, set()) for seed in (7, 7, 8)]
    same = lambda a, b: all(x[0].tolist() == y[0].tolist() for x, y in zip(a, b, strict=True))  # noqa: E731
    assert same(drawn[0], drawn[1]) and not same(drawn[0], drawn[2])  # the seed decides the draw
    # the log-prob each token was drawn with is the policy's own at the sampling temperature (what the loss's
    # importance weight compares), to float32's rounding
    import torch.nn.functional as F

    from llmkit.train.tasks.grpo import answer_rows, token_logps

    answers = [ids for ids, _ in drawn[0]]
    rows = answer_rows([prompts[i // 3] for i in range(6)], answers, np.zeros(6), 0, "grpo", [lp for _, lp in drawn[0]])
    with torch.no_grad():
        own = token_logps(policy(input_ids=rows["input_ids"], attention_mask=rows["attention_mask"]).logits,
                          rows["labels"], temperature=1.5)  # fmt: skip
    vllm = F.pad(rows["sampling_logps"][:, 1:], (0, 1))
    answered = F.pad(rows["labels"][:, 1:], (0, 1), value=-100) != -100
    assert int(answered.sum()) == 6 * 8
    torch.testing.assert_close(vllm[answered], own[answered], atol=2e-4, rtol=0)
    many = [np.arange(40) + i for i in range(32)]  # more prompt tokens than one of vLLM's batches holds
    assert len(sampler.sample(many, 16, 3, sampled, set())) == 32 * 16


@pytest.mark.slow
def test_grpo_sampled_by_vllm_resumes_bitwise(heads_of_32: Path, prompts: Path, tmp_path: Path) -> None:
    """With engine vllm a run killed inside an accumulation window resumes (a new engine, handed the checkpoint's
    weights) to the uninterrupted run's weights, to the bit; its adapter loads in plain peft, from a compiled bf16
    run too, and no run leaves the engine's config folder behind (a killed one, one that ends with os._exit).
    (That it learns is bench/grpo_proof.py --engine vllm: docs/rl.md.)"""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    engine_folders = set(Path(tempfile.gettempdir()).glob("llmkit-vllm-*"))
    model = heads_of_32
    extra = ["--set", "finetune.grpo.engine=vllm", "--set", "train.grad_accum_steps=2",
             "--set", "checkpoint.every_steps=2"]  # fmt: skip
    reference = run_cli(*grpo_args(model, prompts, tmp_path / "ref", *extra, steps=6))
    assert reference.exit_code == 0, reference.stderr
    records = [json.loads(line) for line in (tmp_path / "ref" / "metrics.jsonl").read_text().splitlines()]
    last = [r for r in records if "reward" in r][-1]
    assert last["sample_tokens_per_s"] > 0
    # vLLM drew the answers with the policy's own probabilities, to float32's rounding and LoRA's dropout in the
    # training forward (0.05): no weight near its bounds
    assert 0 < last["vllm_logp_gap"] < 1e-2 and last["vllm_weight_bound"] == 0
    killed_then_resumed(grpo_args(model, prompts, tmp_path / "run", *extra, steps=6), at="3.0")
    assert_same_weights(tmp_path / "run" / "final" / ADAPTER, tmp_path / "ref" / "final" / ADAPTER)
    PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model / "final"), tmp_path / "run" / "final")
    from tests.gpu_defaults import TRACED, plain_load  # what a GPU user gets: compiled, bf16 (vLLM in bf16 too)

    compiled = run_cli(*grpo_args(model, prompts, tmp_path / "compiled", "--set", "finetune.grpo.engine=vllm",
                                  *TRACED, steps=2))  # fmt: skip
    assert compiled.exit_code == 0, compiled.stderr + compiled.stdout
    plain_load(tmp_path / "compiled" / "final", model / "final")
    assert set(Path(tempfile.gettempdir()).glob("llmkit-vllm-*")) == engine_folders


@pytest.mark.slow
def test_vllm_on_two_processes_resumes_bitwise(heads_of_32: Path, prompts: Path, tmp_path: Path) -> None:
    """DDP over gloo, an engine on each process (vLLM's external launcher over the launcher's process group): a
    run resumed on two processes from its step-2 checkpoint ends with the uninterrupted run's weights, to the bit."""
    model, run = heads_of_32, tmp_path / "run"
    args = grpo_args(model, prompts, run, "--set", "finetune.grpo.engine=vllm", "--set", "checkpoint.every_steps=2",
                     steps=4)  # fmt: skip
    two = ["--cpu", "--num-processes", "2", "--main-process-port", "29543"]
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
    launch = [sys.executable, "-m", "llmkit", *args, *two]
    whole = subprocess.run(launch, env=env, capture_output=True, text=True, timeout=600)
    assert whole.returncode == 0, whole.stderr[-3000:]
    (run / "final" / ADAPTER).rename(tmp_path / "uninterrupted.safetensors")
    shutil.rmtree(run / "final")
    shutil.rmtree(run / "checkpoints" / "step-00000004")
    resumed = subprocess.run([*launch, "--resume", "auto"], env=env, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "step-00000002" in resumed.stdout
    assert_same_weights(run / "final" / ADAPTER, tmp_path / "uninterrupted.safetensors")
