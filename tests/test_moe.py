"""Mixture-of-experts models train with their routers' load-balancing loss, as their own forward adds it."""

from __future__ import annotations

import json
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import Llama4ForCausalLM, Llama4TextConfig, MixtralConfig, MixtralForCausalLM

from llmkit.data.corpus import color_chats
from llmkit.data.templates import Encoded
from llmkit.data.tokenizer import train_bpe
from llmkit.flops import count_parameters, matmul_parameters
from llmkit.losses import IGNORE
from llmkit.train.job import next_token_loss
from llmkit.train.packing import collate_rows
from llmkit.train.step import MicroStep, router_balance
from tests.conftest import assert_nothing_written, assert_user_error, run_cli
from tests.gpu_defaults import plain_load


def tiny_mixtral(vocab: int = 128, coefficient: float = 0.05) -> MixtralForCausalLM:
    torch.manual_seed(0)
    config = MixtralConfig(
        vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2, router_aux_loss_coef=coefficient,
        max_position_embeddings=128, attn_implementation="sdpa",
    )  # fmt: skip
    return MixtralForCausalLM(config)


def padded_batch(lengths: list[int]) -> dict[str, torch.Tensor]:
    """Rows of different lengths, one example each, padded on the right as fine-tuning collates them."""
    rng = np.random.default_rng(0)
    rows = []
    for n in lengths:
        ids = rng.integers(1, 128, n)
        labels = ids.copy()
        labels[: n // 3] = IGNORE  # a prompt
        rows.append([Encoded(ids=ids, labels=labels, truncated=False)])
    return collate_rows(rows, pad_id=0, attn_implementation="sdpa")


@pytest.mark.parametrize("backend", [None, "aot_eager"])
def test_the_balanced_loss_is_the_models_own_loss_with_labels(backend: str | None) -> None:
    model = tiny_mixtral()
    batch = padded_batch([17, 30, 9])
    router = router_balance(model)
    assert router is not None
    step = MicroStep(next_token_loss, nullcontext, backend, fixed_shapes=False, router=router.attach())
    total, targets = step(model, batch)
    own = model(input_ids=batch["input_ids"], attention_mask=batch["token_mask"].long(),
                position_ids=batch["position_ids"], labels=batch["labels"], output_router_logits=True)  # fmt: skip
    assert own.aux_loss > 0
    torch.testing.assert_close(total / targets, own.loss, rtol=1e-5, atol=1e-6)
    plain = model(input_ids=batch["input_ids"], attention_mask=batch["token_mask"].long(),
                  position_ids=batch["position_ids"], labels=batch["labels"])  # fmt: skip
    assert abs(float(total.detach() / targets) - float(plain.loss.detach())) > 1e-4  # the balance is there
    torch.testing.assert_close(torch.tensor(step.router.take()), own.aux_loss, rtol=1e-5, atol=1e-6)
    assert step.router.take() is None  # taken once
    total.backward()
    router = model.model.layers[0].mlp.gate.weight
    assert router.grad is not None and router.grad.abs().sum() > 0


def test_dense_models_and_a_zero_coefficient_have_no_balancing_loss(tiny_run: Path) -> None:
    assert router_balance(tiny_mixtral(coefficient=0.0)) is None
    assert router_balance(plain_load(tiny_run / "final")) is None


def test_finetuning_a_mixture_of_experts_reports_the_balance_and_saves_the_model(tmp_path: Path) -> None:
    rows = list(color_chats(64, 0))
    tokenizer = train_bpe((m["content"] for row in rows for m in row["messages"]), vocab_size=300)
    base = tmp_path / "mixtral"
    model = tiny_mixtral(vocab=len(tokenizer))
    model.config.output_router_logits = True  # the model's own loss reads a 2-D mask: llmkit's packed rows have none
    model.save_pretrained(base)
    tokenizer.save_pretrained(base)
    data = tmp_path / "chat.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    out = tmp_path / "run"
    result = run_cli("finetune", "--model", base, "--data", data, "--out", out, "--max-steps", "6",
                     "--micro-batch-size", "4", "--max-length", "64", "--lr", "3e-3", "--no-compile",
                     "--set", "train.eval_every=3", "--set", "train.eval_batches=2", "--set", "logging.every_steps=3",
                     "--set", "logging.plot=false")  # fmt: skip
    assert result.exit_code == 0, result.stderr + result.stdout
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if "loss" in r and "router_aux_loss" in r]
    assert len(train) == 2 and all(r["router_aux_loss"] > 0 for r in train)
    model = plain_load(out / "final")
    assert model.config.num_local_experts == 4


def test_a_mixture_of_experts_whose_balancing_loss_is_unknown_is_refused(tmp_path: Path) -> None:
    """Llama 4's transformers code computes no load-balancing loss: training it silently without one is refused."""
    rows = list(color_chats(16, 0))
    tokenizer = train_bpe((m["content"] for row in rows for m in row["messages"]), vocab_size=300)
    config = Llama4TextConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, intermediate_size_mlp=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=8, num_local_experts=4, num_experts_per_tok=1,
        router_aux_loss_coef=0.01,
    )  # fmt: skip
    base = tmp_path / "llama4"
    Llama4ForCausalLM(config).save_pretrained(base)
    tokenizer.save_pretrained(base)
    data = tmp_path / "chat.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    result = run_cli("finetune", "--model", base, "--data", data, "--out", tmp_path / "run", "--max-steps", "2",
                     "--micro-batch-size", "4", "--max-length", "64", "--no-compile")  # fmt: skip
    assert_user_error(result, str(base), "llama4_text", "router_aux_loss_coef to 0", f"{base}/config.json")
    assert_nothing_written(tmp_path, "run")


def test_throughput_counts_only_the_experts_a_token_is_routed_to() -> None:
    model = tiny_mixtral()  # 4 experts, 2 per token: half the expert weights multiply each token
    _, total = count_parameters(model)
    experts = sum(p.numel() for name, p in model.named_parameters() if ".experts." in name)
    assert experts > total / 2
    embedding = model.get_input_embeddings().weight.numel()
    assert matmul_parameters(model, total) == total - embedding - experts // 2
