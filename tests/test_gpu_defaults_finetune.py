"""What a GPU user gets, run on the CPU, for every fine-tuning path: the training step compiled, in bf16 autocast,
from the same base, rows and seed as an eager bf16 run. Both finals load in plain transformers/peft with every key,
and the compiled run's logits sit within a tenth of the way training moved them. LoRA SFT compiles with inductor
(one graph for rows of every length, merged and exported with parity); the other paths trace the same step with
aot_eager, which checks everything but the generated kernels in a fraction of the time."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from llmkit.data.corpus import color_chats, story_preference_pairs
from tests.conftest import run_cli
from tests.gpu_defaults import GPU_DEFAULTS, TRACED, assert_one_graph, clear_compile_counters, logits_of, plain_load


@pytest.fixture(scope="module")
def chats(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("gpu_defaults") / "chat.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in color_chats(120, 0)))
    return path


@pytest.fixture(scope="module")
def pairs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("gpu_defaults") / "pairs.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in story_preference_pairs(200, 0)))
    return path


@pytest.fixture(scope="module")
def teacher(tiny_run: Path, chats: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A short SFT of the base: its tokenizer holds the chat template's tokens, as the student's will."""
    out = tmp_path_factory.mktemp("gpu_defaults") / "teacher"
    result = run_cli("finetune", "--model", tiny_run, "--data", chats, "--out", out, "--max-steps", "2",
                     "--micro-batch-size", "4", "--max-length", "64", "--no-compile")  # fmt: skip
    assert result.exit_code == 0, result.stderr
    return out


# path -> (its arguments, the compile settings). LoRA dropout is off: compiled dropout draws other masks than eager.
PATHS = {
    "sft-lora": (["--method", "lora", "--set", "finetune.lora.dropout=0"], GPU_DEFAULTS),
    "sft-lora-checkpointed": (
        ["--method", "lora", "--set", "finetune.lora.dropout=0", "--gradient-checkpointing"],
        TRACED,
    ),
    "sft-full": ([], TRACED),
    "sft-freeze": (["--method", "freeze", "--set", "finetune.freeze_top_layers=1"], TRACED),
    "dpo-lora": (["--task", "dpo", "--method", "lora", "--set", "finetune.lora.dropout=0"], TRACED),
    "reward": (["--task", "reward"], TRACED),
    "distill": (["--task", "distill", "--teacher", "{teacher}"], TRACED),
}


@pytest.mark.parametrize("path", list(PATHS))
def test_compiled_bf16_finetuning_saves_what_eager_training_saves(
    path: str, tiny_run: Path, chats: Path, pairs: Path, teacher: Path, tmp_path: Path
) -> None:
    data = pairs if path in ("dpo-lora", "reward") else chats
    extra, compiled_args = PATHS[path]
    extra = [arg.format(teacher=teacher) for arg in extra]
    finals = {}
    for mode, settings in (("compiled", compiled_args), ("eager", ["--no-compile", "--precision", "bf16"])):
        out = tmp_path / mode
        clear_compile_counters()
        result = run_cli("finetune", "--model", tiny_run, "--data", data, "--out", out, "--max-steps", "6",
                         "--micro-batch-size", "4", "--max-length", "64", "--lr", "3e-3", "--set", "train.eval_every=3",
                         "--set", "train.eval_batches=2", "--set", "logging.plot=false", *settings, *extra)  # fmt: skip
        assert result.exit_code == 0, result.stderr + result.stdout
        if mode == "compiled":
            assert_one_graph()  # rows of every length (and preference batches of any number of pairs) reuse it
        finals[mode] = plain_load(out / "final")
        plain_load(out / "checkpoints" / "step-00000006" / "model")
    ids = torch.tensor([[1, 5, 9, 14, 20, 33, 41, 57, 60, 71, 88, 90]])
    compiled, eager = logits_of(finals["compiled"], ids), logits_of(finals["eager"], ids)
    if path == "reward":  # a new scoring head: nothing to measure the way from
        assert (compiled - eager).norm() <= 0.1 * eager.norm()
        return
    before = logits_of(plain_load(tiny_run / "final"), ids)
    vocab = min(before.shape[-1], eager.shape[-1])
    moved = (eager[..., :vocab] - before[..., :vocab]).norm()
    assert moved > 0
    assert (compiled[..., :vocab] - eager[..., :vocab]).norm() <= 0.1 * moved, (path, moved)
    if path == "sft-lora":  # the merged export of a compiled run, checked against it by export's own parity gate
        merged = run_cli("export", tmp_path / "compiled", "--out", tmp_path / "merged", "--merge-lora")
        assert merged.exit_code == 0, merged.stderr
        plain_load(tmp_path / "merged")


def test_compiled_classification_saves_its_head(tmp_path: Path) -> None:
    from tests.test_classify import minilm, write_rows

    out = tmp_path / "classify"
    result = run_cli("finetune", "--task", "classify", "--model", minilm(), "--data",
                     write_rows(tmp_path / "rows.jsonl", 64, seed=0), "--out", out, "--max-steps", "4", "--lr", "5e-5",
                     "--micro-batch-size", "8", "--max-length", "32", *TRACED)  # fmt: skip
    assert result.exit_code == 0, result.stderr + result.stdout
    model = plain_load(out / "final")
    assert model.config.num_labels == 2
    saved = load_file(out / "final" / "model.safetensors")
    assert any(key.startswith("classifier.") for key in saved) and not any("_orig_mod" in key for key in saved)
