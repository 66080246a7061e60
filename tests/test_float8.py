"""precision.dtype=fp8: torchao's float8 training of the model body's linear layers.

Float8 tensor cores exist on Ada and Hopper GPUs; on the CPU torchao emulates them with the same rounding, so the
numerics are checked here: the loss curve follows bf16's, checkpoints hold plain weights, and a killed fp8 run,
compiled as on a GPU, resumes bitwise. The speed-up is measured on a GPU (tests/test_gpu.py, bench/mfu.py --fp8).
"""

from __future__ import annotations

import copy
import json
import signal
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from tests.conftest import assert_nothing_written, assert_user_error, run_cli, tiny_train_args
from tests.gpu_defaults import TRACED, assert_one_graph, clear_compile_counters, plain_load
from tests.test_finetune import write_chat_rows
from tests.test_resume import assert_same_run, llmkit_subprocess, resume_args

# Wider than the suite's tiny model, so that training moves the loss by a few nats and float8 rounding has
# something to disturb: 2 layers x 64, 14 float8 layers (attention and MLP projections), output head in bf16.
WIDER = ["--set", "model.hidden_size=64", "--set", "model.n_heads=4", "--set", "model.n_kv_heads=2"]


def losses(run: Path) -> dict[int, float]:
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in lines if "loss" in r}


def test_on_the_cpu_torchaos_emulation_computes_what_torchs_float8_matmul_does() -> None:
    """The CPU runs float8 training in torchao's emulation (a float32 matmul of the float8-rounded operands), not in
    torch's CPU float8 matmul, a reference kernel some 50x slower: both give the same outputs and gradients up to
    the order of float32's sums."""
    from torchao.float8 import Float8LinearConfig, convert_to_float8_training

    torch.manual_seed(0)
    layer, x = torch.nn.Linear(176, 64, bias=False), torch.randn(2, 100, 176)
    results = []
    for emulate in (False, True):
        model = torch.nn.Sequential(copy.deepcopy(layer))
        convert_to_float8_training(model, config=Float8LinearConfig(pad_inner_dim=True, emulate=emulate))
        inputs = x.clone().requires_grad_()
        out = model(inputs)
        (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
        results.append((out.detach(), inputs.grad, model[0].weight.grad))
    for kernel, emulated in zip(*results, strict=True):  # float32's rounding, on the scale of the tensor
        torch.testing.assert_close(emulated, kernel, rtol=0, atol=1e-6 * float(kernel.abs().max()))
    bf16 = layer(x.bfloat16().float())  # and float8's rounding is coarser than bf16's: it did compute something else
    assert not torch.allclose(results[1][0], bf16, rtol=1e-3, atol=1e-3)


def test_fp8_follows_the_bf16_loss_curve_and_saves_plain_weights(tiny_dataset: Path, tmp_path: Path) -> None:
    def train(precision: str) -> tuple[Path, str]:
        out = tmp_path / precision
        args = [*tiny_train_args(tiny_dataset, out, steps=60), *WIDER, "--precision", precision]
        result = run_cli("pretrain", *args, "--set", "checkpoint.every_steps=1000")
        assert result.exit_code == 0, result.stderr + result.stdout
        return out, result.stdout

    (bf16, bf16_out), (fp8, fp8_out) = train("bf16"), train("fp8")
    assert "float8 matmuls in 14 linear layers" in fp8_out and "float8" not in bf16_out
    reference, measured = losses(bf16), losses(fp8)
    assert reference.keys() == measured.keys()
    assert reference[60] < reference[5] - 1.0  # the run learns, so the comparison means something
    for step, loss in reference.items():  # float8 rounding moves the curve by about 0.1% (measured), here and there
        assert measured[step] == pytest.approx(loss, rel=0.01), (step, measured[step], loss)
    assert measured != reference  # and float8 did compute something else
    summary = json.loads((fp8 / "summary.json").read_text())
    assert summary["val_loss"] == pytest.approx(json.loads((bf16 / "summary.json").read_text())["val_loss"], rel=0.01)

    weights, plain = load_file(fp8 / "final" / "model.safetensors"), load_file(bf16 / "final" / "model.safetensors")
    assert weights.keys() == plain.keys() and all(w.dtype == torch.float32 for w in weights.values())
    model = AutoModelForCausalLM.from_pretrained(fp8 / "final")  # no torchao needed to load it
    assert all(type(m) is torch.nn.Linear for m in model.modules() if isinstance(m, torch.nn.Linear))


def test_a_killed_compiled_fp8_run_resumes_bitwise_and_saves_plain_weights(tiny_dataset: Path, tmp_path: Path) -> None:
    """fp8 as a GPU runs it, compiled (traced whole here, without generating code): one graph, never recompiled or
    broken; killed mid-step and resumed, the bits of the run never killed; its model loads in plain transformers."""

    def args(out: Path) -> list[str]:
        return [*resume_args(tiny_dataset, out, steps=12), *TRACED, "--precision", "fp8"]

    clear_compile_counters()
    reference = run_cli("pretrain", *args(tmp_path / "reference"))
    assert reference.exit_code == 0, reference.stderr
    assert "float8 matmuls in" in reference.stdout
    assert_one_graph()
    plain_load(tmp_path / "reference" / "final")
    proc = llmkit_subprocess("pretrain", *args(tmp_path / "run"), env={"LLMKIT_FAULT_INJECT": "kill@10.1"})
    proc.wait(timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.read() if proc.stderr else ""
    resumed = run_cli("pretrain", *args(tmp_path / "run"), "--resume", "auto")
    assert resumed.exit_code == 0, resumed.stderr
    assert f"resuming from {tmp_path / 'run' / 'checkpoints' / 'step-00000008'}" in resumed.stdout
    assert_same_run(tmp_path / "run", tmp_path / "reference")


def test_fp8_refusals_are_one_line_before_anything_is_written(
    tiny_dataset: Path, tiny_run: Path, tmp_path: Path
) -> None:
    gpt2 = ["--data", tiny_dataset, "--out", tmp_path / "gpt2", "--max-steps", "3", "--precision", "fp8",
            "--set", "model.arch=gpt2", "--set", "model.n_layers=2", "--set", "model.hidden_size=32",
            "--set", "model.n_heads=4"]  # fmt: skip
    assert_user_error(run_cli("pretrain", *gpt2), "precision.dtype=fp8", "gpt2", "Conv1D", "--precision bf16")
    assert_nothing_written(tmp_path, "gpt2")

    rows = write_chat_rows(tmp_path / "chat.jsonl", 40)
    lora = ["finetune", "--model", tiny_run, "--data", rows, "--out", tmp_path / "lora", "--method", "lora"]
    assert_user_error(run_cli(*lora, "--precision", "fp8"), "finetune.method=lora", "--precision bf16")
    assert_nothing_written(tmp_path, "lora")
    zero = [
        *tiny_train_args(tiny_dataset, tmp_path / "zero"),
        "--precision",
        "fp8",
        "--set",
        "distributed.strategy=zero2",
    ]
    assert_user_error(run_cli("pretrain", *zero), "distributed.strategy=zero2", "ddp only")
    assert_nothing_written(tmp_path, "zero")


def test_a_full_fp8_fine_tune_trains(tiny_run: Path, tmp_path: Path) -> None:
    rows = write_chat_rows(tmp_path / "chat.jsonl", 120)
    out = tmp_path / "full"
    result = run_cli("finetune", "--model", tiny_run, "--data", rows, "--out", out, "--max-steps", "12",
                     "--micro-batch-size", "4", "--max-length", "64", "--lr", "1e-3", "--precision", "fp8",
                     "--set", "logging.every_steps=3", "--set", "train.eval_every=6")  # fmt: skip
    assert result.exit_code == 0, result.stderr + result.stdout
    assert "float8 matmuls in" in result.stdout
    curve = losses(out)
    assert curve[12] < curve[3]
