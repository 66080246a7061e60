"""What a GPU user gets, run on the CPU, for pretraining: torch.compile (inductor) and bf16 autocast, checked as the
eager runs are. The artifacts load in plain transformers with no missing or unexpected key and hold the weights the
run trained; eval and export work on them; a killed compiled run resumes bitwise; the step is one graph, never
recompiled or broken."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import run_cli, tiny_train_args
from tests.gpu_defaults import (
    GPU_DEFAULTS,
    TRACED,
    assert_one_graph,
    clear_compile_counters,
    logits_of,
    plain_load,
    val_loss,
)

# Llama with attention dropout drawn inside the compiled graph (inductor; the resume test compiles the same graph,
# from the cache), GPT-2 traced (aot_eager: its keys, tied head and loss; its kernels are of the kinds Llama's are).
ARCH = {"llama": [*GPU_DEFAULTS, "--set", "model.dropout=0.1"],
        "gpt2": [*TRACED, "--set", "model.arch=gpt2", "--set", "model.n_kv_heads=null"]}  # fmt: skip


@pytest.mark.parametrize("arch", list(ARCH))
def test_compiled_bf16_pretraining_saves_the_weights_it_trained(arch: str, tiny_dataset: Path, tmp_path: Path) -> None:
    """final/ and every checkpoint load with all their keys, and the reloaded model's validation loss is the one
    the run measured (an untrained model's is far above it); eval and a parity-checked export run on it."""
    out = tmp_path / arch
    clear_compile_counters()
    result = run_cli("pretrain", *tiny_train_args(tiny_dataset, out, steps=20), *ARCH[arch])
    assert result.exit_code == 0, result.stderr + result.stdout
    assert_one_graph()  # validation and checkpoints every 10 steps run eagerly: nothing recompiles
    final = plain_load(out / "final")
    for checkpoint in sorted((out / "checkpoints").glob("step-*")):
        plain_load(checkpoint / "model")
    ids = torch.arange(32).reshape(1, 32) % 300
    last = plain_load(out / "checkpoints" / "step-00000020" / "model")
    torch.testing.assert_close(logits_of(last, ids), logits_of(final, ids))
    measured = json.loads((out / "summary.json").read_text())["val_loss"]
    assert val_loss(final, tiny_dataset, micro=8, batches=4) == pytest.approx(measured, rel=1e-2)
    assert measured < 0.9 * math.log(final.config.vocab_size)
    report = tmp_path / "eval.json"
    assert run_cli("eval", out, "--data", tiny_dataset, "--report", report).exit_code == 0
    assert json.loads(report.read_text())["perplexity"] == pytest.approx(math.exp(measured), rel=0.1)
    exported = run_cli("export", out, "--out", tmp_path / "export")
    assert exported.exit_code == 0, exported.stderr


def test_a_killed_compiled_run_resumes_bitwise(tiny_dataset: Path, tmp_path: Path) -> None:
    """Compiled with inductor, bf16, dropout drawn inside the compiled graph: killed mid-step and resumed in a new
    process (which compiles again), its weights are the bits of the run never killed."""
    args = [
        *tiny_train_args(tiny_dataset, Path("OUT"), steps=12)[4:],
        *ARCH["llama"],
        "--set",
        "checkpoint.every_steps=4",
    ]

    def launch(out: Path, *extra: str, fault: str | None = None) -> subprocess.CompletedProcess:
        # One thread: inductor's CPU reductions add the threads' partial sums in no fixed order (on a GPU,
        # train.deterministic makes the compiled kernels repeat).
        env = {**os.environ, "OMP_NUM_THREADS": "1", **({"LLMKIT_FAULT_INJECT": fault} if fault else {})}
        command = [sys.executable, "-m", "llmkit", "pretrain", "--data", str(tiny_dataset), "--out", str(out), *args]
        return subprocess.run([*command, *extra], env=env, capture_output=True, text=True, timeout=600)

    whole, killed = tmp_path / "whole", tmp_path / "killed"
    assert launch(whole).returncode == 0
    assert launch(killed, fault="kill@7.0").returncode != 0
    resumed = launch(killed, "--resume", "auto")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    a, b = load_file(whole / "final" / "model.safetensors"), load_file(killed / "final" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
