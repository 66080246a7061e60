"""The chunked and fused causal-LM losses equal the plain cross-entropy over full float32 logits, in value and in
gradients, whatever the chunking; a real model's fused loss equals its logits' loss."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import llmkit.losses as losses
from llmkit.losses import IGNORE, causal_lm_nll, fused_lm_nll


def plain_nll(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    logits = F.linear(hidden, weight)
    targets = F.pad(labels[:, 1:], (0, 1), value=IGNORE).reshape(-1)
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets, ignore_index=IGNORE, reduction="sum")


@pytest.fixture
def case() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    hidden = torch.randn(3, 17, 24, generator=generator)
    weight = torch.randn(101, 24, generator=generator) * 0.3
    labels = torch.randint(0, 101, (3, 17), generator=generator)
    labels[0, :6] = IGNORE  # a masked prompt
    labels[2, 9:] = IGNORE  # padding
    return hidden, weight, labels


@pytest.mark.parametrize("chunk_rows", [10_000, 7, 1])  # one chunk, uneven chunks, one row at a time
def test_chunked_and_fused_losses_equal_the_plain_one(case, chunk_rows: int, monkeypatch) -> None:
    monkeypatch.setattr(losses, "CHUNK_ELEMENTS", chunk_rows * 101)
    hidden, weight, labels = case
    leaves = [hidden.clone().requires_grad_(), weight.clone().requires_grad_()]
    expected = plain_nll(*leaves, labels)
    expected_grads = torch.autograd.grad(expected * 0.37, leaves)  # a scale, as a normalized loss has

    for name in ("fused", "chunked"):
        leaves = [hidden.clone().requires_grad_(), weight.clone().requires_grad_()]
        if name == "fused":
            total, count = fused_lm_nll(*leaves, labels)
        else:
            total, count = causal_lm_nll(F.linear(*leaves), labels)
        grads = torch.autograd.grad(total * 0.37, leaves)
        assert int(count) == int((labels[:, 1:] != IGNORE).sum())
        assert float(total.detach()) == pytest.approx(float(expected.detach()), rel=1e-6), name
        for got, want in zip(grads, expected_grads, strict=True):
            assert torch.allclose(got, want, rtol=1e-5, atol=1e-6), (name, (got - want).abs().max())


def test_fused_loss_under_bf16_autocast_matches_the_plain_one_and_keeps_dtypes(case) -> None:
    """Under autocast the head's matmul runs in bf16 as the model's own head would; gradients come back in the
    dtypes of the inputs (float32 master weights)."""
    hidden, weight, labels = case
    leaves = [hidden.clone().requires_grad_(), weight.clone().requires_grad_()]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected = plain_nll(*leaves, labels)
    expected_grads = torch.autograd.grad(expected, leaves)
    leaves = [hidden.clone().requires_grad_(), weight.clone().requires_grad_()]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        total, _ = fused_lm_nll(*leaves, labels)
    grads = torch.autograd.grad(total, leaves)
    assert float(total.detach()) == pytest.approx(float(expected.detach()), rel=1e-3)
    for got, want, leaf in zip(grads, expected_grads, leaves, strict=True):
        assert got.dtype == leaf.dtype == torch.float32
        assert torch.allclose(got, want, rtol=2e-2, atol=2e-2)


def test_a_frozen_head_gets_no_gradient_and_costs_no_matmul(case) -> None:
    hidden, weight, labels = case
    hidden = hidden.clone().requires_grad_()
    total, _ = fused_lm_nll(hidden, weight, labels)  # weight does not require grad (LoRA's frozen head)
    total.backward()
    assert hidden.grad is not None and weight.grad is None


def test_a_real_model_trains_through_the_fused_head_with_its_own_loss() -> None:
    """A tiny Llama: with the head deferred, the loss from hidden states equals the loss from the logits of the
    same model before the swap, gradients included; the state dict keeps its keys."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from llmkit.models import HiddenStatesHead, defer_output_head

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)  # fmt: skip
    model = LlamaForCausalLM(config)
    ids = torch.randint(0, 96, (2, 12))
    reference, _ = causal_lm_nll(model(input_ids=ids).logits, ids)
    reference.backward()
    expected = {name: p.grad.clone() for name, p in model.named_parameters()}
    keys = set(model.state_dict())
    model.zero_grad()

    weight = defer_output_head(model)
    assert isinstance(model.lm_head, HiddenStatesHead) and weight is model.get_input_embeddings().weight
    total, _ = fused_lm_nll(model(input_ids=ids).logits, weight, ids)
    total.backward()
    assert float(total.detach()) == pytest.approx(float(reference.detach()), rel=1e-6)
    for name, parameter in model.named_parameters():
        assert torch.allclose(parameter.grad, expected[name], rtol=1e-4, atol=1e-6), name
    assert set(model.state_dict()) == keys


def test_under_no_grad_the_losses_only_compute_the_value(case) -> None:
    """Validation runs under no_grad: the same value, and no gradient work (nothing saved for backward)."""
    hidden, weight, labels = case
    expected = float(plain_nll(hidden, weight, labels))
    with torch.no_grad():
        fused, _ = fused_lm_nll(hidden.requires_grad_(), weight.requires_grad_(), labels)
        chunked, _ = causal_lm_nll(F.linear(hidden, weight), labels)
    assert float(fused) == pytest.approx(expected, rel=1e-6) and float(chunked) == pytest.approx(expected, rel=1e-6)
    assert fused.grad_fn is None


def test_inside_a_compiled_graph_both_losses_give_the_plain_values_and_gradients(case) -> None:
    """A compiled training step computes the loss with the plain formula (tracing the chunked Functions gave zero
    gradients under torch 2.11: a GPU run compiled by default then trained nothing)."""
    hidden, weight, labels = case
    leaves = [hidden.clone().requires_grad_(), weight.clone().requires_grad_()]
    expected = torch.autograd.grad(plain_nll(*leaves, labels) * 0.37, leaves)
    for name, loss in (("fused", lambda h, w: fused_lm_nll(h, w, labels)[0]),
                       ("chunked", lambda h, w: causal_lm_nll(F.linear(h, w), labels)[0])):  # fmt: skip
        leaves = [hidden.clone().requires_grad_(), weight.clone().requires_grad_()]
        value = torch.compile(loss, backend="aot_eager", fullgraph=True)(*leaves)
        assert float(value.detach()) == pytest.approx(float(plain_nll(hidden, weight, labels)), rel=1e-5), name
        for got, want in zip(torch.autograd.grad(value * 0.37, leaves), expected, strict=True):
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5, msg=name)
