"""Longer context: a loaded RoPE model's context extended 4x (model.rope_scaling), trained, evaluated and exported at
the new length."""

from __future__ import annotations

import json
import random
from pathlib import Path

import gguf
import pytest
import torch
from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

from llmkit.data.corpus import STORIES, sample, story_preference_pairs
from tests.conftest import assert_nothing_written, assert_user_error, run_cli, tiny_train_args
from tests.gpu_defaults import plain_load


@pytest.fixture(scope="module")
def long_rows(tiny_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Text rows of several stories each: 100-250 tokens under the tiny run's tokenizer, past its 64-token context."""
    tokenizer = AutoTokenizer.from_pretrained(tiny_run / "final")
    rng = random.Random(0)
    rows: list[str] = []
    while len(rows) < 48:
        row = sample(STORIES, rng).text
        while len(tokenizer(row)["input_ids"]) < 100:
            row += " " + sample(STORIES, rng).text
        if len(tokenizer(row)["input_ids"]) <= 250:
            rows.append(row)
    path = tmp_path_factory.mktemp("long") / "long.jsonl"
    path.write_text("".join(json.dumps({"text": row}) + "\n" for row in rows))
    return path


def test_a_context_extended_four_times_trains_evaluates_and_exports_at_the_new_length(
    tiny_run: Path, long_rows: Path, tmp_path: Path
) -> None:
    out = tmp_path / "yarn"
    result = run_cli("finetune", "--model", tiny_run / "final", "--data", long_rows, "--out", out, "--max-steps", "4",
                     "--micro-batch-size", "2", "--max-length", "256", "--lr", "1e-3", "--no-compile",
                     "--set", "model.rope_scaling=yarn", "--set", "model.rope_factor=4", "--set", "train.eval_every=4",
                     "--set", "train.eval_batches=2", "--set", "logging.plot=false")  # fmt: skip
    assert result.exit_code == 0, result.stderr + result.stdout
    stats = json.loads((out / "data_stats.json").read_text())
    assert stats["truncated"] == 0  # every row trained whole, past the old context
    model = plain_load(out / "final")
    assert model.config.max_position_embeddings == 256
    rope = model.config.rope_parameters
    assert (rope["rope_type"], rope["factor"], rope["original_max_position_embeddings"]) == ("yarn", 4.0, 64)
    # The reloaded model is the trained one at the new length: its rotary frequencies are YaRN's, not the base's.
    base = plain_load(tiny_run / "final")
    assert not torch.allclose(model.model.rotary_emb.inv_freq, base.model.rotary_emb.inv_freq)
    ids = torch.randint(1, 300, (1, 256), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.isfinite(model(input_ids=ids).logits).all()
    report = tmp_path / "eval.json"
    evaluated = run_cli("eval", out, "--data", long_rows, "--report", report, "--max-batches", "2")
    assert evaluated.exit_code == 0, evaluated.stderr
    scored = json.loads(report.read_text())
    assert scored["tokens"] == 2 * 8 * 255  # two batches of eight 256-token windows (the new context), 255 targets
    # A run resumed or fine-tuned again from the extended model is not extended twice.
    again = run_cli("finetune", "--model", out / "final", "--data", long_rows, "--out", tmp_path / "again",
                    "--max-steps", "1", "--micro-batch-size", "2", "--max-length", "256", "--no-compile",
                    "--set", "model.rope_scaling=yarn", "--set", "model.rope_factor=4")  # fmt: skip
    assert again.exit_code == 0, again.stderr
    assert plain_load(tmp_path / "again" / "final").config.max_position_embeddings == 256
    # GGUF says the same to llama.cpp.
    exported = run_cli("export", out, "--out", tmp_path / "gguf", "--format", "gguf")
    assert exported.exit_code == 0, exported.stderr
    reader = gguf.GGUFReader(next((tmp_path / "gguf").glob("*.gguf")))
    fields = {name: field.contents() for name, field in reader.fields.items() if "rope.scaling" in name}
    assert fields == {"llama.rope.scaling.type": "yarn", "llama.rope.scaling.factor": 4.0,
                      "llama.rope.scaling.original_context_length": 64}  # fmt: skip


def test_rope_scaling_needs_a_loaded_rope_model(tiny_dataset: Path, tiny_run: Path, long_rows: Path,
                                                tmp_path: Path) -> None:  # fmt: skip
    scratch = run_cli("pretrain", *tiny_train_args(tiny_dataset, tmp_path / "scratch", steps=2),
                      "--set", "model.rope_scaling=linear", "--set", "model.rope_factor=2")  # fmt: skip
    assert_user_error(scratch, "model.rope_scaling extends a loaded model", "model.context_length")
    assert_nothing_written(tmp_path, "scratch")
    alone = run_cli("pretrain", *tiny_train_args(tiny_dataset, tmp_path / "alone", steps=2),
                    "--set", "model.rope_scaling=linear")  # fmt: skip
    assert_user_error(alone, "rope_scaling and rope_factor go together")
    tokenizer = AutoTokenizer.from_pretrained(tiny_run / "final")
    gpt2 = tmp_path / "gpt2"
    GPT2LMHeadModel(
        GPT2Config(vocab_size=len(tokenizer), n_positions=64, n_embd=32, n_layer=1, n_head=2)
    ).save_pretrained(gpt2)
    tokenizer.save_pretrained(gpt2)
    rope = ["--set", "model.rope_scaling=linear", "--set", "model.rope_factor=2"]
    learned = run_cli("finetune", "--model", gpt2, "--data", long_rows, "--out", tmp_path / "learned", "--max-steps",
                      "1", "--max-length", "128", *rope)  # fmt: skip
    assert_user_error(learned, str(gpt2), "gpt2 has no rotary position embedding")
    assert_nothing_written(tmp_path, "learned")
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps(row) + "\n" for row in story_preference_pairs(16, 0)))
    scorer = run_cli("finetune", "--task", "reward", "--model", tiny_run / "final", "--data", pairs, "--out",
                     tmp_path / "scorer", "--max-steps", "1", "--max-length", "128", *rope)  # fmt: skip
    assert_user_error(scorer, "model.rope_scaling is not supported for --task reward")
    assert_nothing_written(tmp_path, "scorer")


def test_plan_counts_the_longer_sequences_and_refuses_what_the_run_would(tiny_run: Path, tmp_path: Path) -> None:
    recipe = tmp_path / "long.yaml"
    recipe.write_text(f"model:\n  init_from: {tiny_run / 'final'}\nfinetune:\n  max_length: 256\n")
    assert_user_error(run_cli("plan", recipe), "finetune.max_length 256 exceeds the model's context of 64", "rope")
    rope = ["--set", "model.rope_scaling=yarn", "--set", "model.rope_factor=4"]
    activations = {}
    for length in (64, 256):
        result = run_cli("plan", recipe, "--json", "--set", f"finetune.max_length={length}", *rope)
        assert result.exit_code == 0, result.stderr
        activations[length] = json.loads(result.stdout)["memory"]["activations"]
    assert activations[256] >= 4 * activations[64]  # the longer rows counted (at least linear in the length)
