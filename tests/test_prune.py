"""`llmkit prune`: importance finds what does not matter (pruning dead heads, channels or an identity block leaves
the logits unchanged), the output is a plain transformers directory with the new shape, and bad requests are one
line. Healing by distillation, measured on the built-in corpus, is bench/prune_proof.py (docs/compression.md)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig

from llmkit.compress.prune import PruneSpec, importance, parameters, prune, resolve
from llmkit.errors import UserError
from tests.conftest import assert_nothing_written, assert_user_error, run_cli


def tiny_llama(heads: int = 4, kv_heads: int = 4) -> torch.nn.Module:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=3,
                         num_attention_heads=heads, num_key_value_heads=kv_heads,
                         max_position_embeddings=32)  # fmt: skip
    return AutoModelForCausalLM.from_config(config).eval()


def test_dead_heads_channels_and_an_identity_block_are_pruned_without_changing_the_logits() -> None:
    model = tiny_llama()
    layers, head_dim = model.model.layers, 8
    with torch.no_grad():
        for layer in layers:
            layer.self_attn.v_proj.weight[1 * head_dim : 2 * head_dim] = 0  # head 1 outputs nothing
            layer.mlp.up_proj.weight[[3, 7, 11, 40]] = 0  # four channels never activate
        layers[1].self_attn.o_proj.weight.zero_()  # block 1 adds nothing to its input
        layers[1].mlp.down_proj.weight.zero_()
    ids = torch.randint(0, 64, (4, 16))
    expected = model(input_ids=ids).logits
    scores = importance(model, [ids])
    assert min(range(3), key=lambda i: scores.blocks[i]) == 1 and scores.blocks[1] < 1e-6
    removed = prune(model, PruneSpec(drop_layers=1, heads=3, mlp=44), scores)
    assert removed["blocks"]["dropped"] == [1]
    assert all(dropped == [1] for dropped in removed["heads"].values())
    assert model.config.num_hidden_layers == 2 and model.config.num_attention_heads == 3
    assert model.config.num_key_value_heads == 3 and model.config.intermediate_size == 44
    assert torch.allclose(model(input_ids=ids).logits, expected, atol=1e-5)


def test_grouped_query_attention_keeps_its_groups_and_a_target_picks_the_counts() -> None:
    model = tiny_llama(heads=4, kv_heads=2)
    total = parameters(model)
    spec = resolve(PruneSpec(target_params=0.8), model)
    assert spec.mlp is not None and spec.mlp % 8 == 0
    depth = resolve(PruneSpec(target_params=0.8, axis="depth"), model)
    assert depth.drop_layers == 1
    with pytest.raises(UserError, match="nothing to remove"):
        resolve(PruneSpec(target_params=1.0, axis="depth"), model)
    with pytest.raises(UserError, match=rf"--target-params 1.5 \(2 of the model's {total:,} parameters\): would drop"):
        resolve(PruneSpec(target_params=1.5, axis="depth"), model)  # above 1 it is a count
    ids = torch.randint(0, 64, (2, 16))
    with pytest.raises(Exception, match="multiple of the 2 key/value groups"):
        prune(model, PruneSpec(heads=3), importance(model, [ids]))
    prune(model, PruneSpec(heads=2, mlp=spec.mlp, hidden=24), importance(model, [ids]))
    assert model.config.num_attention_heads == 2 and model.config.num_key_value_heads == 2
    assert model.config.head_dim == 8 and model.config.hidden_size == 24
    assert parameters(model) <= 0.8 * total
    model(input_ids=ids)  # still runs with the new shapes


def test_prune_writes_a_plain_transformers_directory_with_a_card(tiny_run: Path, tiny_dataset: Path,
                                                                 tmp_path: Path) -> None:  # fmt: skip
    out = tmp_path / "pruned"
    result = run_cli("prune", tiny_run, "--out", out, "--data", tiny_dataset, "--drop-layers", "1", "--mlp", "64",
                     "--hidden", "24", "--batches", "2")  # fmt: skip
    assert result.exit_code == 0, result.stderr
    model = AutoModelForCausalLM.from_pretrained(out)
    report = json.loads((out / "prune_report.json").read_text())
    assert model.config.num_hidden_layers == 1 and model.config.hidden_size == 24
    assert report["parameters_after"] == sum(p.numel() for p in model.parameters())
    assert report["parameters_after"] < report["parameters_before"]
    assert report["held_out_perplexity_after"] > 1 and report["removed"]["blocks"]["dropped"]
    card = (out / "README.md").read_text()
    assert "## What was removed" in card and "## What it cost" in card and "--teacher" in card
    healed = run_cli("pretrain", "--data", tiny_dataset, "--init-from", out, "--teacher", tiny_run, "--out",
                     tmp_path / "healed", "--max-steps", "4", "--micro-batch-size", "4")  # fmt: skip
    assert healed.exit_code == 0, healed.stderr  # the pruned directory is a valid student


def test_prune_refuses_bad_requests_in_one_line(tiny_run: Path, tiny_dataset: Path, tmp_path: Path) -> None:
    def prune_cli(name: str, *args: str):
        return run_cli("prune", tiny_run, "--out", tmp_path / name, "--data", tiny_dataset, *args)

    assert_user_error(prune_cli("a"), "say what to remove")
    assert_user_error(prune_cli("b", "--heads", "3"), "--heads 3: keep a multiple of the 2 key/value groups")
    assert_user_error(prune_cli("c", "--target-params", "0.5", "--mlp", "8"), "--target-params picks the counts")
    assert_user_error(prune_cli("d", "--drop-layers", "2"), "--drop-layers 2: the model has 2 blocks")
    assert_user_error(prune_cli("e", "--target-params", "0.75", "--axis", "sideways"), "--axis sideways")
    assert_user_error(prune_cli("f", "--mlp", "32", "--batches", "0"), "--batches 0: must be at least 1")
    assert_user_error(prune_cli("g", "--hidden", "33"), "--hidden 33: keep between 1 and the model's 32")
    assert_user_error(prune_cli("h", "--drop-layers", "-1"), "--drop-layers -1: the model has 2 blocks")
    for name in "abcdefgh":
        assert_nothing_written(tmp_path, name)
