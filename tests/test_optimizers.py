"""The leaner optimizers (8-bit AdamW, Muon with AdamW): they train, their state restores to the bit, plan counts it."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import pytest
import torch

from llmkit.config import OptimizerConfig
from llmkit.train.checkpoint import safe_torch_load
from llmkit.train.optimizers import MuonWithAdamW, build_optimizer
from tests.conftest import assert_user_error, run_cli, tiny_train_args
from tests.gpu_defaults import plain_load

LEANER = ["adamw8bit", "muon"]


def train_steps(model: torch.nn.Module, optimizer: torch.optim.Optimizer, seeds: range) -> None:
    for seed in seeds:
        ids = torch.randint(0, 300, (2, 24), generator=torch.Generator().manual_seed(seed))
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()


@pytest.mark.parametrize("name", LEANER)
def test_the_optimizer_state_restores_to_the_bit(name: str, tiny_run: Path, tmp_path: Path) -> None:
    """Saved after three steps and loaded into a fresh optimizer (as a resume does), the next steps are the ones the
    uninterrupted optimizer takes."""
    cfg = OptimizerConfig(name=name, lr=3e-3, momentum=0.95)
    model = plain_load(tiny_run / "final").train()
    optimizer = build_optimizer(model, cfg)
    if name == "muon":
        assert isinstance(optimizer, MuonWithAdamW)
        muon = {id(p) for g in optimizer.muon.param_groups for p in g["params"]}
        assert id(model.model.layers[0].self_attn.q_proj.weight) in muon  # hidden matrices
        assert id(model.model.embed_tokens.weight) not in muon  # embeddings and norms: AdamW
    train_steps(model, optimizer, range(3))
    torch.save(optimizer.state_dict(), tmp_path / "optimizer.pt")
    restored_model = copy.deepcopy(model)
    restored = build_optimizer(restored_model, cfg)
    restored.load_state_dict(safe_torch_load(tmp_path / "optimizer.pt"))  # what resume loads, pickles refused
    train_steps(model, optimizer, range(3, 6))
    train_steps(restored_model, restored, range(3, 6))
    for (key, a), b in zip(model.state_dict().items(), restored_model.state_dict().values(), strict=True):
        assert torch.equal(a, b), key
    if name == "adamw8bit":  # the big matrices' moments really are 8-bit
        kinds = {type(s["exp_avg"]).__name__ for s in optimizer.state.values()}
        assert "OptimState8bit" in kinds


@pytest.mark.parametrize("name", LEANER)
def test_the_leaner_optimizers_pretrain(name: str, tiny_dataset: Path, tmp_path: Path) -> None:
    out = tmp_path / name
    result = run_cli("pretrain", *tiny_train_args(tiny_dataset, out, steps=20), "--set", f"optimizer.name={name}",
                     "--set", "optimizer.momentum=0.95", "--set", "logging.plot=false")  # fmt: skip
    assert result.exit_code == 0, result.stderr + result.stdout
    losses = [json.loads(line)["val_loss"] for line in (out / "metrics.jsonl").read_text().splitlines()
              if "val_loss" in line]  # fmt: skip
    assert losses[-1] < losses[0] - 0.2 and losses[-1] < math.log(448) - 0.8  # learning, well below uniform guessing
    plain_load(out / "final")


def test_plan_counts_their_state(tmp_path: Path) -> None:
    recipe = tmp_path / "r.yaml"
    recipe.write_text("model:\n  n_layers: 4\n  hidden_size: 256\n  n_heads: 4\n")
    state = {}
    for name in ("adamw", "adamw8bit", "muon"):
        result = run_cli("plan", recipe, "--json", "--set", f"optimizer.name={name}")
        assert result.exit_code == 0, result.stderr
        state[name] = json.loads(result.stdout)["memory"]["optimizer"]
    assert state["adamw8bit"] == pytest.approx(state["adamw"] / 4, rel=0.02)  # two 8-bit moments and their scales
    assert state["adamw"] / 2 < state["muon"] < state["adamw"]  # one moment for matrices, two for the rest


def test_what_the_leaner_settings_cannot_do_is_one_line(tiny_dataset: Path, tiny_run: Path, tmp_path: Path) -> None:
    zero = run_cli("pretrain", *tiny_train_args(tiny_dataset, tmp_path / "z"), "--set", "optimizer.name=muon",
                   "--set", "distributed.strategy=zero2")  # fmt: skip
    assert_user_error(zero, "optimizer.name=muon", "distributed.strategy=zero2", "ddp")
    rows = tmp_path / "rows.jsonl"
    rows.write_text(json.dumps({"text": "The cat is red."}) + "\n")
    lora = run_cli("finetune", "--model", tiny_run, "--data", rows, "--out", tmp_path / "l", "--method", "lora",
                   "--set", "optimizer.name=muon")  # fmt: skip
    assert_user_error(lora, "optimizer.name=muon", "LoRA")
    qlora = run_cli("finetune", "--model", tiny_run, "--data", rows, "--out", tmp_path / "q", "--method", "qlora",
                    "--set", "finetune.lora.init=pissa")  # fmt: skip
    assert_user_error(qlora, "finetune.lora.init=pissa rewrites the base weights", "qlora")
    dora = run_cli("finetune", "--model", tiny_run, "--data", rows, "--out", tmp_path / "d", "--method", "lora",
                   "--set", "finetune.lora.init=olora", "--set", "finetune.lora.dora=true")  # fmt: skip
    assert_user_error(dora, "init=olora and dora together")


def test_activation_offload_trains_the_same_weights_and_plan_counts_it(tiny_dataset: Path, tmp_path: Path) -> None:
    """Saved activations in CPU memory change where they live, not what is computed: the same weights to the bit.
    (On a CPU the copy is to the same memory; tests/test_gpu.py measures the GPU memory it saves.)"""
    finals = {}
    for offload in ("false", "true"):
        out = tmp_path / f"offload-{offload}"
        result = run_cli("pretrain", *tiny_train_args(tiny_dataset, out, steps=6), "--no-compile",
                         "--set", f"train.activation_offload={offload}", "--set", "logging.plot=false")  # fmt: skip
        assert result.exit_code == 0, result.stderr + result.stdout
        finals[offload] = plain_load(out / "final").state_dict()
    assert all(torch.equal(finals["true"][k], v) for k, v in finals["false"].items())
    compiled = run_cli("pretrain", *tiny_train_args(tiny_dataset, tmp_path / "c"), "--compile",
                       "--set", "train.activation_offload=true")  # fmt: skip
    assert_user_error(compiled, "train.activation_offload", "torch.compile", "--no-compile")
    recipe = tmp_path / "r.yaml"
    recipe.write_text("model:\n  n_layers: 4\n  hidden_size: 256\n  n_heads: 4\n")
    plans = [json.loads(run_cli("plan", recipe, "--json", "--set", f"train.activation_offload={o}").stdout)
             for o in ("false", "true")]  # fmt: skip
    assert plans[1]["memory"]["activations"] < plans[0]["memory"]["activations"]
    assert any("activation offload" in note for note in plans[1]["notes"])
