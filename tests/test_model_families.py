"""The families a user pretrains and later fine-tunes: a Qwen3-style block from scratch, fine-tuned and exported."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from llmkit.data.corpus import color_chats
from tests.conftest import pretrained, run_cli
from tests.gpu_defaults import plain_load, val_loss


@pytest.fixture(scope="module")
def qwen3_run(tiny_dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return pretrained(tiny_dataset, tmp_path_factory, "qwen3", "model.arch=qwen3")


def test_a_qwen3_block_pretrains_from_scratch_through_transformers_own_class(
    qwen3_run: Path, tiny_dataset: Path
) -> None:
    model = plain_load(qwen3_run / "final")
    assert type(model).__name__ == "Qwen3ForCausalLM"
    attention = model.model.layers[0].self_attn
    assert attention.q_norm.weight.shape == (8,) and attention.k_proj.out_features == 2 * 8  # QK-norm, 2 KV heads
    records = [json.loads(line) for line in (qwen3_run / "metrics.jsonl").read_text().splitlines()]
    losses = [r["val_loss"] for r in records if "val_loss" in r]
    assert losses[-1] < losses[0] - 0.5  # it learns
    assert val_loss(model, tiny_dataset, 8, 4) == pytest.approx(losses[-1], rel=1e-4)  # and saved what it learnt


def test_a_pretrained_qwen3_fine_tunes_with_lora_on_its_own_projections(qwen3_run: Path, tmp_path: Path) -> None:
    rows = tmp_path / "chat.jsonl"
    rows.write_text("".join(json.dumps(row) + "\n" for row in color_chats(64, 0)))
    out = tmp_path / "sft"
    result = run_cli("finetune", "--model", qwen3_run, "--data", rows, "--out", out, "--method", "lora",
                     "--max-steps", "4", "--micro-batch-size", "4", "--max-length", "64", "--no-compile",
                     "--set", "logging.plot=false")  # fmt: skip
    assert result.exit_code == 0, result.stderr + result.stdout
    adapter = json.loads((out / "final" / "adapter_config.json").read_text())
    assert set(adapter["target_modules"]) >= {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj"}
    model = plain_load(out / "final", base=qwen3_run / "final")
    with torch.no_grad():
        assert torch.isfinite(model(input_ids=torch.tensor([[1, 2, 3]])).logits).all()


def tiny_family(family: str, vocab: int) -> torch.nn.Module:
    """A two-layer model of `family` with its own config class: GQA, and heads sized apart from the width where the
    family does that."""
    import transformers

    shape = {"vocab_size": vocab, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
             "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 128}  # fmt: skip
    config = {
        "mistral": lambda: transformers.MistralConfig(**shape, sliding_window=None),
        "qwen2": lambda: transformers.Qwen2Config(**shape),
        "qwen3": lambda: transformers.Qwen3Config(**shape, head_dim=32),
        "gemma": lambda: transformers.GemmaConfig(**shape, head_dim=32),
    }[family]()
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config)
    with torch.no_grad():  # norms away from their initial ones, so a wrong offset shows
        for name, parameter in model.named_parameters():
            if "norm" in name:
                parameter.uniform_(-0.5, 0.5)
    return model


GGUF_FAMILIES = {  # family -> (llama.cpp's architecture, a tensor only that layout has)
    "mistral": ("llama", "blk.0.attn_q.weight"),
    "qwen2": ("qwen2", "blk.0.attn_q.bias"),
    "qwen3": ("qwen3", "blk.1.attn_k_norm.weight"),
    "gemma": ("gemma", "blk.0.ffn_norm.weight"),
}


@pytest.mark.parametrize("family", list(GGUF_FAMILIES))
def test_the_families_people_fine_tune_export_to_gguf(family: str, tiny_run: Path, tmp_path: Path) -> None:
    import gguf
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_run / "final")
    source = tmp_path / family
    model = tiny_family(family, len(tokenizer))
    model.save_pretrained(source)
    tokenizer.save_pretrained(source)
    result = run_cli("export", source, "--out", tmp_path / "gguf", "--format", "gguf", "--dtype", "f32")
    assert result.exit_code == 0, result.stderr + result.stdout  # read back and compared by export's parity gate
    report = json.loads((tmp_path / "gguf" / "export_report.json").read_text())
    assert report["max_abs_logit_diff"] <= 1e-4 and report["greedy_agreement"] == 1.0
    reader = gguf.GGUFReader(tmp_path / "gguf" / "model.gguf")
    arch, marker = GGUF_FAMILIES[family]
    assert reader.fields["general.architecture"].contents() == arch
    tensors = {t.name: t for t in reader.tensors}
    assert marker in tensors
    if family == "gemma":  # llama.cpp multiplies by the stored norm weight: 1 + w
        stored = torch.from_numpy(tensors["blk.0.attn_norm.weight"].data.copy())
        torch.testing.assert_close(stored, model.model.layers[0].input_layernorm.weight.detach() + 1)
    if family == "qwen3":  # heads sized apart from the width
        assert reader.fields["qwen3.attention.key_length"].contents() == 32
