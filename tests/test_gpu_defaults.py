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
from types import SimpleNamespace

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
    summary = json.loads((out / "summary.json").read_text())
    assert summary["compiled"] is True and summary["first_step_seconds"] > 0  # the wait, said before and after it
    assert "first step compiles the training step" in result.stdout and "compiling the training step" in result.stdout
    final = plain_load(out / "final")
    for checkpoint in sorted((out / "checkpoints").glob("step-*")):
        plain_load(checkpoint / "model")
    ids = torch.arange(32).reshape(1, 32) % 300
    last = plain_load(out / "checkpoints" / "step-00000020" / "model")
    torch.testing.assert_close(logits_of(last, ids), logits_of(final, ids))
    measured = summary["val_loss"]
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


@pytest.mark.parametrize("method", ["full", "lora"])
def test_a_checkpointed_compiled_step_is_one_graph_with_the_eager_gradients(method: str) -> None:
    """Gradient checkpointing (what `llmkit plan` suggests for long rows) under torch.compile and bf16 autocast:
    the step is one graph, never recompiled (it was broken at every layer: by transformers' hooks inside the
    recomputed layers and by the hook that makes the embeddings' output require a gradient), and its gradients are
    the eager step's. Inductor for the full model, the same graph traced only for LoRA."""
    from llmkit.config import LoraConfig, load_config
    from llmkit.models import Vocabulary, attach_lora, build_model
    from llmkit.train.setup import enable_gradient_checkpointing, language_model_loss
    from llmkit.train.step import MicroStep

    cfg = load_config(Path(__file__).parent.parent / "recipes" / "tiny-cpu.yaml", ["data.vocab_size=512"])
    torch.manual_seed(0)
    model = build_model(cfg.model, Vocabulary(512)).train()
    if method == "lora":
        model = attach_lora(model, LoraConfig(r=4, dropout=0.0), "CAUSAL_LM", [])
    enable_gradient_checkpointing(model)
    loss_fn = language_model_loss(model, SimpleNamespace(whole_weights=True))  # type: ignore[arg-type]
    autocast = lambda: torch.autocast("cpu", dtype=torch.bfloat16)  # noqa: E731
    trained = [p for p in model.parameters() if p.requires_grad]

    def gradients(step: MicroStep, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        total, targets = step(model, batch)
        (total / targets).backward()
        flat = torch.cat([p.grad.flatten() for p in trained])  # type: ignore[union-attr]
        model.zero_grad(set_to_none=True)
        return flat

    clear_compile_counters()
    compiled = MicroStep(loss_fn, autocast, "inductor" if method == "full" else "aot_eager")
    eager = MicroStep(loss_fn, autocast, None)
    for seed in range(2):
        ids = torch.randint(0, 512, (2, 64), generator=torch.Generator().manual_seed(seed))
        batch = {"input_ids": ids, "labels": ids}
        expected = gradients(eager, batch)
        assert torch.linalg.vector_norm(gradients(compiled, batch) - expected) < 0.02 * torch.linalg.vector_norm(
            expected
        )
    assert_one_graph()
