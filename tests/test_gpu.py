"""GPU paths: mixed precision with and without loss scaling. Skipped without CUDA (marker `gpu`)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from tests.conftest import run_cli, tiny_train_args
from tests.gpu_defaults import plain_load

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("precision", ["bf16", "fp16", "fp32"])
def test_pretrain_on_cuda(precision: str, tiny_dataset: Path, tmp_path: Path) -> None:
    out = tmp_path / precision
    result = run_cli("pretrain", *tiny_train_args(tiny_dataset, out, steps=20), "--precision", precision)
    assert result.exit_code == 0, result.stderr
    losses = [json.loads(line).get("loss") for line in (out / "metrics.jsonl").read_text().splitlines()]
    losses = [loss for loss in losses if loss is not None]
    assert all(math.isfinite(loss) for loss in losses) and losses[-1] < losses[0]
    report = run_cli("eval", out, "--data", tiny_dataset)
    assert report.exit_code == 0, report.stderr
    plain_load(out / "final")  # compiled (the CUDA default): every key loads in plain transformers
    plain_load(out / "checkpoints" / "step-00000020" / "model")


@pytest.mark.parametrize("strategy", ["fsdp", "zero3"])
def test_sharded_strategies_on_one_gpu_resume_exactly_and_export_whole(
    strategy: str, tiny_dataset: Path, tmp_path: Path
) -> None:
    """One GPU process (accelerate launch in FSDP / DeepSpeed mode), bf16: killed mid-run, resumed, equal to the
    run never killed; the export holds whole tensors. Written for when a GPU is lent; skipped on CPU."""
    import os
    import subprocess
    import sys

    import torch
    from safetensors.torch import load_file

    def launch(out: Path, *extra: str, fault: str | None = None) -> subprocess.CompletedProcess:
        args = [sys.executable, "-m", "llmkit", "pretrain", *tiny_train_args(tiny_dataset, out, steps=20),
                "--precision", "bf16", "--strategy", strategy, "--num-processes", "1", *extra]  # fmt: skip
        env = {**os.environ, **({"LLMKIT_FAULT_INJECT": fault} if fault else {})}
        return subprocess.run(args, env=env, capture_output=True, text=True, timeout=600)

    whole, killed = tmp_path / "whole", tmp_path / "killed"
    assert launch(whole).returncode == 0
    assert launch(killed, fault="kill@15.0").returncode != 0
    resumed = launch(killed, "--resume", "auto")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    a, b = load_file(whole / "final" / "model.safetensors"), load_file(killed / "final" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) and a[k].numel() > 0 for k in a)
    state = json.loads((whole / "checkpoints" / "step-00000020" / "trainer_state.json").read_text())
    assert state["strategy"] == ("fsdp" if strategy == "fsdp" else "zero3")
    assert run_cli("export", whole, "--out", tmp_path / "export", "--dtype", "bfloat16").exit_code == 0


def test_more_processes_than_gpus_is_refused_and_cpu_runs_them(tiny_dataset: Path, tmp_path: Path) -> None:
    import torch

    from tests.conftest import assert_user_error

    too_many = str(torch.cuda.device_count() + 1)
    args = ["pretrain", *tiny_train_args(tiny_dataset, tmp_path / "run", steps=4), "--num-processes", too_many]
    assert_user_error(run_cli(*args), f"--num-processes {too_many} on a machine with", "--cpu")
    assert not (tmp_path / "run").exists()


def test_deterministic_gpu_runs_repeat_and_resume_bitwise(tiny_dataset: Path, tmp_path: Path) -> None:
    """train.deterministic on CUDA: two runs give the same bits, and a run killed mid-step and resumed gives the
    bits of the run never killed (without it, GPU kernels may sum in another order from run to run)."""
    import os
    import subprocess
    import sys

    import torch
    from safetensors.torch import load_file

    def launch(out: Path, *extra: str, fault: str | None = None) -> subprocess.CompletedProcess:
        args = [sys.executable, "-m", "llmkit", "pretrain", *tiny_train_args(tiny_dataset, out, steps=20),
                "--precision", "bf16", "--set", "train.deterministic=true", *extra]  # fmt: skip
        env = {**os.environ, **({"LLMKIT_FAULT_INJECT": fault} if fault else {})}
        return subprocess.run(args, env=env, capture_output=True, text=True, timeout=600)

    first, second, killed = tmp_path / "first", tmp_path / "second", tmp_path / "killed"
    assert launch(first).returncode == 0
    assert launch(second).returncode == 0
    assert launch(killed, fault="kill@15.0").returncode != 0
    resumed = launch(killed, "--resume", "auto")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    a = load_file(first / "final" / "model.safetensors")
    for other in (second, killed):
        b = load_file(other / "final" / "model.safetensors")
        assert all(torch.equal(a[k], b[k]) for k in a), other.name


def test_frozen_lora_base_is_bf16_on_the_gpu_and_memory_is_reported(tiny_run: Path, tmp_path: Path) -> None:
    rows = tmp_path / "rows.jsonl"
    rows.write_text("".join(json.dumps({"prompt": f"Say {i}.", "completion": f"{i} it is."}) + "\n" for i in range(64)))
    out = tmp_path / "lora"
    result = run_cli("finetune", "--model", tiny_run, "--data", rows, "--out", out, "--method", "lora",
                     "--precision", "bf16", "--max-steps", "6", "--max-length", "64")  # fmt: skip
    assert result.exit_code == 0, result.stderr
    stats = json.loads((out / "data_stats.json").read_text())
    assert stats["frozen_bytes"] == 2 * (stats["total_parameters"] - stats["trainable_parameters"])
    plain_load(out / "final")  # compiled by default on CUDA: the adapter holds every tensor, under its own name
    memory = json.loads((out / "summary.json").read_text())["memory"]
    assert 0 < memory["peak_allocated_gib"] <= memory["peak_reserved_gib"]


@pytest.mark.parametrize("checkpointing", [False, True])
def test_qlora_on_the_gpu_learns_and_saves_an_adapter_plain_peft_loads(
    checkpointing: bool, tiny_run: Path, tmp_path: Path
) -> None:
    """QLoRA (4-bit NF4 base, bitsandbytes) with the CUDA defaults (compiled step, bf16): the loss falls, the
    adapter loads in plain peft with every tensor, and gradient checkpointing is what the run asked for."""
    pytest.importorskip("bitsandbytes")
    rows = tmp_path / "rows.jsonl"
    rows.write_text("".join(json.dumps({"prompt": f"Say {i}.", "completion": f"{i} it is."}) + "\n" for i in range(64)))
    out = tmp_path / "qlora"
    result = run_cli("finetune", "--model", tiny_run, "--data", rows, "--out", out, "--method", "qlora",
                     "--max-steps", "12", "--max-length", "64", "--lr", "3e-3", "--set", "logging.every_steps=1",
                     *(["--gradient-checkpointing"] if checkpointing else []))  # fmt: skip
    assert result.exit_code == 0, result.stderr
    losses = [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()
              if "loss" in json.loads(line)]  # fmt: skip
    assert losses[-1] < losses[0]
    plain_load(out / "final", base=tiny_run)
    from llmkit.train.tasks.base import load_quantized

    assert not load_quantized(tiny_run, None).is_gradient_checkpointing  # peft's default would turn it on


def test_liger_kernels_keep_the_losses(tiny_dataset: Path, tmp_path: Path) -> None:
    """model.kernels=liger (RMSNorm, SwiGLU and the fused linear cross-entropy in Triton) trains the same
    curve as PyTorch's kernels, within bf16 rounding."""
    pytest.importorskip("liger_kernel")
    common = ["--precision", "bf16", "--no-compile", "--set", "logging.every_steps=1"]
    runs = {}
    for kernels in ("liger", "none"):
        out = tmp_path / kernels
        result = run_cli("pretrain", *tiny_train_args(tiny_dataset, out, steps=10), *common,
                         "--set", f"model.kernels={kernels}")  # fmt: skip
        assert result.exit_code == 0, result.stderr
        runs[kernels] = [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()
                         if "loss" in json.loads(line)]  # fmt: skip
    assert runs["liger"] == pytest.approx(runs["none"], rel=2e-2)
    # Liger's patches stay on the model they were applied to: an export in this process runs on the CPU.
    exported = run_cli("export", tmp_path / "liger", "--out", tmp_path / "export")
    assert exported.exit_code == 0, exported.stderr


def test_dpo_in_bf16_on_the_gpu_learns_and_resumes_from_its_reference(tiny_run: Path, tmp_path: Path) -> None:
    """DPO with LoRA in bf16 on CUDA: the reference log-probs are computed once (in bf16, like training), the
    held-out reward accuracy rises, and a resumed run reads the same reference file."""
    from llmkit.data.corpus import story_preference_pairs

    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in story_preference_pairs(600, 0)))
    out = tmp_path / "dpo"
    args = ["finetune", "--task", "dpo", "--method", "lora", "--model", tiny_run, "--data", data, "--out", out,
            "--max-length", "64", "--micro-batch-size", "16", "--lr", "5e-3", "--precision", "bf16",
            "--set", "train.eval_every=20", "--set", "checkpoint.every_steps=20"]  # fmt: skip
    first = run_cli(*args, "--max-steps", "40")
    assert first.exit_code == 0, first.stderr
    reference = (out / "reference_logps.npy").read_bytes()
    evaluation = json.loads((out / "summary.json").read_text())["evaluation"]
    assert evaluation["val_rewards/accuracy"] >= 0.8 and evaluation["val_rewards/margin"] > 0
    longer = run_cli(*args, "--max-steps", "60", "--resume", "auto", "--allow-config-change")
    assert longer.exit_code == 0, longer.stderr
    assert (out / "reference_logps.npy").read_bytes() == reference


def test_fp8_on_the_gpu_follows_bf16_or_is_refused_before_ada(tiny_dataset: Path, tmp_path: Path) -> None:
    """precision fp8 on CUDA, compiled (the default there): torchao's float8 matmuls keep bf16's loss curve; a GPU
    without float8 tensor cores (before compute capability 8.9) is one line naming its capability."""
    import torch

    from tests.conftest import assert_user_error

    wider = ["--set", "model.hidden_size=64", "--set", "checkpoint.every_steps=1000"]
    if torch.cuda.get_device_capability() < (8, 9):
        result = run_cli("pretrain", *tiny_train_args(tiny_dataset, tmp_path / "fp8", steps=6), "--precision", "fp8")
        assert_user_error(result, "precision.dtype=fp8", "compute capability 8.9")
        return
    curves = {}
    for precision in ("bf16", "fp8"):
        out = tmp_path / precision
        result = run_cli("pretrain", *tiny_train_args(tiny_dataset, out, steps=60), *wider, "--precision", precision)
        assert result.exit_code == 0, result.stderr
        assert ("float8 matmuls in" in result.stdout) == (precision == "fp8")
        curves[precision] = [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()
                             if "loss" in json.loads(line)]  # fmt: skip
    assert curves["bf16"][-1] < curves["bf16"][0] - 1.0
    assert curves["fp8"] == pytest.approx(curves["bf16"], rel=2e-2)


def test_a_mixture_of_experts_compiles_on_the_gpu_with_its_balancing_loss() -> None:
    """The CPU suite traces the MoE step with aot_eager; on the GPU the default is inductor in bf16."""
    from contextlib import nullcontext

    import torch

    from llmkit.train.job import next_token_loss
    from llmkit.train.step import MicroStep, router_balance
    from tests.test_moe import padded_batch, tiny_mixtral

    model = tiny_mixtral().cuda()
    batch = {k: v.cuda() for k, v in padded_batch([17, 30, 9]).items()}
    router = router_balance(model)
    assert router is not None
    step = MicroStep(next_token_loss, nullcontext, "inductor", fixed_shapes=False, router=router.attach())
    total, targets = step(model, batch)
    own = model(input_ids=batch["input_ids"], attention_mask=batch["token_mask"].long(),
                position_ids=batch["position_ids"], labels=batch["labels"], output_router_logits=True)  # fmt: skip
    torch.testing.assert_close(total / targets, own.loss, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", ["adamw8bit", "muon"])
def test_the_leaner_optimizers_on_the_gpu(name: str, tiny_dataset: Path, tmp_path: Path) -> None:
    out = tmp_path / name
    result = run_cli("pretrain", *tiny_train_args(tiny_dataset, out, steps=20), "--precision", "bf16",
                     "--set", f"optimizer.name={name}", "--set", "optimizer.momentum=0.95")  # fmt: skip
    assert result.exit_code == 0, result.stderr + result.stdout
    losses = [json.loads(line)["val_loss"] for line in (out / "metrics.jsonl").read_text().splitlines()
              if "val_loss" in line]  # fmt: skip
    assert losses[-1] < losses[0] and math.isfinite(losses[-1])
    plain_load(out / "final")


def test_activation_offload_lowers_the_gpu_peak(tiny_dataset: Path, tmp_path: Path) -> None:
    peaks = {}
    for offload in ("false", "true"):
        out = tmp_path / offload
        settings = ["--no-compile", "--precision", "bf16", "--set", f"train.activation_offload={offload}"]
        result = run_cli(
            "pretrain", *tiny_train_args(tiny_dataset, out, steps=6), *settings, "--micro-batch-size", "32"
        )
        assert result.exit_code == 0, result.stderr + result.stdout
        records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        peaks[offload] = max(r.get("peak_allocated_gib", 0) for r in records)
    assert peaks["true"] < peaks["false"], peaks
