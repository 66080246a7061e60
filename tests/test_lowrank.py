"""`llmkit factor`: truncated SVD of every block's projections. Exact where the weights have that rank, the rank an
energy share asks for, the factored directory loaded by llmkit (and refused loudly by plain transformers), and
the dense form equal to it in plain transformers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig

from llmkit.compress.lowrank import factor_model, rank_for
from llmkit.factored import densify
from llmkit.models import load_trained_model
from tests.conftest import assert_user_error, run_cli


def test_the_rank_an_energy_share_keeps() -> None:
    singular = torch.tensor([3.0, 2.0, 1.0])  # squared: 9, 4, 1 of 14
    assert rank_for(singular, None, 0.6) == 1 and rank_for(singular, None, 0.9) == 2
    assert rank_for(singular, None, 0.99) == 3 and rank_for(singular, 2, None) == 2


def test_weights_of_rank_r_factor_exactly_and_the_dense_form_is_the_same_function() -> None:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=32)  # fmt: skip
    model = AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        for name, module in model.named_modules():
            if isinstance(module, torch.nn.Linear) and name.startswith("model.layers"):
                out_features, in_features = module.weight.shape
                module.weight.copy_(torch.randn(out_features, 8) @ torch.randn(8, in_features) / 8)
    ids = torch.randint(0, 64, (2, 16))
    expected = model(input_ids=ids).logits
    ranks = factor_model(model, rank=8)
    assert len(ranks) == 14 and set(ranks.values()) == {8}
    assert torch.allclose(model(input_ids=ids).logits, expected, atol=1e-4)
    densify(model)
    assert isinstance(model.model.layers[0].self_attn.q_proj, torch.nn.Linear)
    assert torch.allclose(model(input_ids=ids).logits, expected, atol=1e-4)


def test_factor_writes_a_directory_llmkit_loads_and_transformers_refuses(tiny_run: Path, tiny_dataset: Path,
                                                                         tmp_path: Path) -> None:  # fmt: skip
    out = tmp_path / "factored"
    result = run_cli("factor", tiny_run, "--out", out, "--rank", "8", "--data", tiny_dataset)
    assert result.exit_code == 0, result.stderr
    report = json.loads((out / "factor_report.json").read_text())
    assert report["parameters_factored"] < report["parameters_before"]
    assert report["held_out_perplexity_after"] >= report["held_out_perplexity_before"] * 0.9
    with pytest.raises(ValueError, match="llmkit_lowrank_llama"):  # an unknown model type, not random weights
        AutoModelForCausalLM.from_pretrained(out)
    factored = load_trained_model(out)
    assert sum(p.numel() for p in factored.parameters()) == report["parameters_factored"]
    assert run_cli("eval", out, "--data", tiny_dataset).exit_code == 0

    dense = tmp_path / "dense"
    assert run_cli("factor", tiny_run, "--out", dense, "--rank", "8", "--dense").exit_code == 0
    plain = AutoModelForCausalLM.from_pretrained(dense).eval()
    ids = torch.randint(0, 300, (2, 12))
    with torch.no_grad():
        assert torch.allclose(plain(input_ids=ids).logits, factored(input_ids=ids).logits, atol=1e-4)
    exported = tmp_path / "hf"
    assert run_cli("export", out, "--out", exported).exit_code == 0  # written dense, for any tool
    AutoModelForCausalLM.from_pretrained(exported)

    assert_user_error(run_cli("factor", tiny_run, "--out", tmp_path / "a"), "give one of --rank or --energy")
    assert_user_error(run_cli("factor", tiny_run, "--out", tmp_path / "b", "--energy", "1.5"), "--energy 1.5")
    assert_user_error(run_cli("factor", tiny_run, "--out", tmp_path / "c", "--rank", "64"), "saves nothing")
    assert not any((tmp_path / name).exists() for name in "abc")
