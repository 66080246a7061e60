"""Fine-tuning: formats, chat templates and the loss mask, packing without cross-contamination, methods."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from typer.testing import CliRunner

from llmkit.cli import app
from llmkit.data.corpus import ANIMAL_COLORS, color_chats
from llmkit.data.formats import Example, normalize
from llmkit.data.templates import encode_example, setup_chat_template
from llmkit.data.tokenizer import train_bpe
from llmkit.losses import IGNORE, causal_lm_nll
from llmkit.train.packing import collate_rows, first_fit_decreasing
from tests.conftest import assert_nothing_written, assert_user_error, run_cli

ANIMALS, COLORS = list(ANIMAL_COLORS), list(ANIMAL_COLORS.values())


def write_chat_rows(path: Path, n: int, seed: int = 0) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in color_chats(n, seed)))
    return path


@pytest.fixture(scope="module")
def chat_rows(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_chat_rows(tmp_path_factory.mktemp("sft") / "chat.jsonl", 240)


def ft_args(model: Path, data: Path, out: Path, *extra: str, steps: int = 12) -> list[str]:
    return ["finetune", "--model", str(model), "--data", str(data), "--out", str(out), "--max-steps", str(steps),
            "--micro-batch-size", "4", "--max-length", "64", "--lr", "1e-3", "--set", "train.eval_every=6",
            "--set", "train.eval_batches=2", "--set", "logging.every_steps=3", *extra]  # fmt: skip


@pytest.fixture(scope="module")
def tokenizer():
    texts = [f"What color is the {a}? The {a} is {c}." for a, c in zip(ANIMALS, COLORS, strict=True)] * 20
    return train_bpe(texts, vocab_size=320)


def test_the_label_mask_covers_exactly_the_assistant_turns(tokenizer) -> None:
    setup_chat_template(tokenizer, "chatml")
    example = Example("x.jsonl:1", messages=(
        {"role": "system", "content": "Answer briefly."},
        {"role": "user", "content": "What color is the cat?"},
        {"role": "assistant", "content": "The cat is red."},
        {"role": "user", "content": "And the dog?"},
        {"role": "assistant", "content": "The dog is blue."},
    ))  # fmt: skip
    encoded = encode_example(tokenizer, example, max_length=512, train_on_prompt=False)
    tokens = tokenizer.convert_ids_to_tokens(encoded.ids.tolist())
    trained = [tok for tok, label in zip(tokens, encoded.labels, strict=True) if label != IGNORE]
    expected = tokenizer.convert_ids_to_tokens(
        tokenizer("The cat is red.<|im_end|>\nThe dog is blue.<|im_end|>\n", add_special_tokens=False)["input_ids"]
    )
    assert trained == expected  # token by token: both answers with their end-of-turn, nothing else
    assert all(
        label == token_id for label, token_id in zip(encoded.labels, encoded.ids, strict=True) if label != IGNORE
    )
    everything = encode_example(tokenizer, example, max_length=512, train_on_prompt=True)
    assert (everything.labels == everything.ids).all()


def test_prompt_completion_and_text_masks(tokenizer) -> None:
    pair = encode_example(tokenizer, Example("x", prompt="What color is the cat?", completion=" red"), 512, False)
    prompt_len = len(tokenizer("What color is the cat?", add_special_tokens=False)["input_ids"])
    assert (pair.labels[:prompt_len] == IGNORE).all() and (pair.labels[prompt_len:] != IGNORE).all()
    assert pair.ids[-1] == tokenizer.eos_token_id
    text = encode_example(tokenizer, Example("x", text="The cat is red."), 512, False)
    assert (text.labels == text.ids).all()
    cut = encode_example(tokenizer, Example("x", text="The cat is red. " * 20), 10, False)
    assert cut.truncated and len(cut.ids) == 10


def test_formats_are_detected_and_normalized() -> None:
    rows = [
        ({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}, "f:1"),
        ({"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]}, "f:1"),
        ({"instruction": "q", "input": "ctx", "output": "a"}, "f:1"),
        ({"prompt": "q", "completion": "a"}, "f:1"),
        ({"text": "t"}, "f:1"),
        ({"question": "q", "answer": "a"}, "f:1"),
    ]
    detected = [next(normalize(iter([row]), "auto", {}))[0] for row in rows[:5]]
    assert detected == ["messages", "sharegpt", "alpaca", "prompt_completion", "text"]
    sharegpt = next(normalize(iter([rows[1]]), "auto", {}))[1]
    assert sharegpt.messages == ({"role": "user", "content": "q"}, {"role": "assistant", "content": "a"})
    alpaca = next(normalize(iter([rows[2]]), "auto", {}))[1]
    assert alpaca.messages[0]["content"] == "q\n\nctx"
    mapped = next(normalize(iter([rows[5]]), "auto", {"instruction": "question", "output": "answer"}))
    assert mapped[0] == "alpaca" and mapped[1].messages[1]["content"] == "a"


def test_packed_loss_equals_the_unpacked_loss(tokenizer) -> None:
    torch.manual_seed(0)
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=384, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)  # fmt: skip
    examples = [encode_example(tokenizer, Example("x", text=f"The {a} is {c}. " * (i % 3 + 1)), 64, False)
                for i, (a, c) in enumerate(zip(ANIMALS, COLORS, strict=True))]  # fmt: skip
    for attn in ("sdpa", "eager"):
        model = LlamaForCausalLM(config).eval()
        model.config._attn_implementation = attn
        with torch.no_grad():
            separate = sum(
                float(causal_lm_nll(model(torch.from_numpy(e.ids)[None]).logits, torch.from_numpy(e.labels)[None])[0])
                for e in examples
            )
            rows = first_fit_decreasing(np.array([len(e.ids) for e in examples]), 64)
            assert len(rows) < len(examples)  # really packed
            batch = collate_rows([[examples[i] for i in row] for row in rows], int(tokenizer.pad_token_id), attn)
            inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "position_ids")}
            packed, count = causal_lm_nll(model(**inputs).logits, batch["labels"])
        assert float(packed) == pytest.approx(separate, rel=1e-5), attn
        assert int(count) == sum(e.trainable for e in examples)


def test_finetune_full_writes_a_chat_model_with_its_template(tiny_run: Path, chat_rows: Path, tmp_path: Path) -> None:
    out = tmp_path / "full"
    result = run_cli(*ft_args(tiny_run, chat_rows, out))
    assert result.exit_code == 0, result.stderr + result.stdout
    assert "packing efficiency" in result.stdout and "template chatml" in result.stdout
    stats = json.loads((out / "data_stats.json").read_text())
    assert stats["efficiency"] >= 0.95 and stats["trainable_parameters"] == stats["total_parameters"]
    tokenizer = AutoTokenizer.from_pretrained(out / "final")
    assert "<|im_start|>" in tokenizer.chat_template  # inference formats prompts as training did
    model = AutoModelForCausalLM.from_pretrained(out / "final")
    assert model.get_input_embeddings().weight.shape[0] >= len(tokenizer)
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert im_end in model.generation_config.eos_token_id  # generation stops at the end of the turn
    from llmkit.data.templates import setup_chat_template

    again = setup_chat_template(tokenizer, "auto")  # a second fine-tune (SFT -> DPO, GRPO) keeps the turn's end
    assert again.name == "tokenizer" and im_end in again.stop_token_ids
    losses = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["val_loss"] for r in losses if "val_loss" in r][-1] < [r["val_loss"] for r in losses if "val_loss" in r][
        0
    ]


@pytest.mark.parametrize(
    ("method", "extra", "max_share"),
    [("lora", ["--set", "finetune.lora.r=4"], 0.5), ("freeze", ["--set", "finetune.freeze_top_layers=1"], 0.9)],
)
def test_lora_and_freeze_train_a_fraction(
    method: str, extra: list[str], max_share: float, tiny_run: Path, chat_rows: Path, tmp_path: Path
) -> None:
    out = tmp_path / method
    result = run_cli(*ft_args(tiny_run, chat_rows, out, "--method", method, *extra))
    assert result.exit_code == 0, result.stderr + result.stdout
    stats = json.loads((out / "data_stats.json").read_text())
    assert 0 < stats["trainable_parameters"] < max_share * stats["total_parameters"]
    assert f"finetune sft ({method})" in result.stdout
    if method == "lora":
        assert (out / "final" / "adapter_config.json").is_file()


def test_lora_and_freeze_name_a_module_that_matches_nothing() -> None:
    """PEFT fails only when no target matches: a misspelt one beside a right one was dropped without a word."""
    from transformers import LlamaConfig

    from llmkit.config.schema import LoraConfig
    from llmkit.errors import UserError
    from llmkit.models import attach_lora, freeze_except

    def tiny() -> torch.nn.Module:
        return AutoModelForCausalLM.from_config(LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32,
                                                            num_hidden_layers=1, num_attention_heads=2))  # fmt: skip

    with pytest.raises(UserError, match="v_porj matches no module of this model .its projections: q_proj, k_proj"):
        attach_lora(tiny(), LoraConfig(target_modules=["q_proj", "v_porj"]), "CAUSAL_LM", [])
    with pytest.raises(UserError, match="embed_tokens is the embedding, whose rows for the chat template's new"):
        attach_lora(tiny(), LoraConfig(target_modules=["q_proj", "embed_tokens"]), "CAUSAL_LM", [62, 63])
    with pytest.raises(UserError, match=r"target_modules \['norm'\]: "):  # PEFT's reason follows
        attach_lora(tiny(), LoraConfig(target_modules=["norm"]), "CAUSAL_LM", [])
    adapted = attach_lora(tiny(), LoraConfig(target_modules=["layers.0.self_attn.q_proj"]), "CAUSAL_LM", [])
    assert sum("lora_A" in name for name, _ in adapted.named_parameters()) == 1  # PEFT's own matching: a full name
    with pytest.raises(UserError, match="trainable_modules: q_porj is in no parameter's name"):
        freeze_except(tiny(), None, ["q_porj", "v_proj"])  # method freeze: only the head would have trained
    frozen = tiny()
    freeze_except(frozen, None, ["v_proj"])
    assert {name for name, p in frozen.named_parameters() if p.requires_grad} >= {
        "model.layers.0.self_attn.v_proj.weight"
    }


def test_padding_is_still_available(tiny_run: Path, chat_rows: Path, tmp_path: Path) -> None:
    result = run_cli(*ft_args(tiny_run, chat_rows, tmp_path / "pad", "--no-packing", steps=4))
    assert result.exit_code == 0, result.stderr
    assert "padding efficiency" in result.stdout


def test_finetune_bad_input(tiny_run: Path, tmp_path: Path) -> None:
    rows = tmp_path / "rows.jsonl"
    rows.write_text(json.dumps({"prompt": "a", "completion": "b"}) + "\n" + json.dumps({"prompt": "c"}) + "\n")
    assert_user_error(run_cli(*ft_args(tiny_run, rows, tmp_path / "o")), f"{rows}:2", "'completion'", "prompt")
    odd = tmp_path / "odd.jsonl"
    odd.write_text(json.dumps({"q": "a", "a": "b"}) + "\n")
    assert_user_error(run_cli(*ft_args(tiny_run, odd, tmp_path / "o")), f"{odd}:1", "cannot detect", "q")
    empty_answers = tmp_path / "empty.jsonl"
    empty_answers.write_text("".join(json.dumps({"prompt": "What color is the cat? " * 30, "completion": "red"}) + "\n"
                                     for _ in range(8)))  # fmt: skip
    assert_user_error(run_cli(*ft_args(tiny_run, empty_answers, tmp_path / "o")), "no trainable tokens",
                      "8 training examples", "truncated")  # fmt: skip
    qlora_on_cpu = ft_args(tiny_run, odd, tmp_path / "o", "--method", "qlora", "--cpu")  # refused on any machine
    assert_user_error(run_cli(*qlora_on_cpu), "qlora needs a CUDA")
    assert_user_error(run_cli("finetune", "--data", str(rows), "--out", str(tmp_path / "o")), "needs a base model")
    good = tmp_path / "good.jsonl"
    good.write_text(
        "".join(json.dumps({"prompt": "What color is the cat?", "completion": " red"}) + "\n" for _ in range(8))
    )
    too_long = run_cli(*ft_args(tiny_run, good, tmp_path / "o", "--max-length", "65"))
    assert_user_error(too_long, "finetune.max_length 65 exceeds the context", "64 tokens", "--max-length 64")
    flash = run_cli(
        *ft_args(tiny_run, good, tmp_path / "o", "--set", "model.attn_implementation=flash_attention_2", "--cpu")
    )
    assert_user_error(flash, "model.attn_implementation=flash_attention_2 needs a CUDA GPU", "use sdpa")
    assert_nothing_written(tmp_path, "o")


def test_the_attention_kernel_asked_for_is_the_one_training_loads(tiny_run: Path) -> None:
    """model.attn_implementation reaches a fine-tune's base, a continued pretraining's and a resumed run's model
    (a model directory saves none, so each load names it); the plan counts a flash-attention recipe anywhere."""
    from llmkit.config import load_config
    from llmkit.models import load_model
    from llmkit.train.tasks import get_task

    cfg = load_config(None, ["model.attn_implementation=eager"])
    for task in ("sft", "dpo"):
        base = get_task(task).load_model(tiny_run / "final", cfg, None, None, None)  # type: ignore[arg-type]
        assert base.config._attn_implementation == "eager"
    assert load_model(tiny_run / "final").config._attn_implementation == "sdpa"
    assert load_model(tiny_run / "final", attn_implementation="eager").config._attn_implementation == "eager"
    plan = run_cli("plan", "tiny-cpu", "--set", "model.attn_implementation=flash_attention_2")
    assert plan.exit_code == 0, plan.stderr


@pytest.fixture(scope="module")
def lora_run(tiny_run: Path, chat_rows: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("lora") / "run"
    result = run_cli(*ft_args(tiny_run, chat_rows, out, "--method", "lora", "--lr", "5e-3", steps=10))
    assert result.exit_code == 0, result.stderr + result.stdout
    return out


def test_merged_lora_export_has_the_logits_of_base_plus_adapter(lora_run: Path, tmp_path: Path) -> None:
    from peft import PeftModel

    merged_dir = tmp_path / "merged"
    result = run_cli("export", lora_run, "--out", merged_dir, "--merge-lora")
    assert result.exit_code == 0, result.stderr
    adapter_config = json.loads((lora_run / "final" / "adapter_config.json").read_text())
    tokenizer = AutoTokenizer.from_pretrained(lora_run / "final")
    base = AutoModelForCausalLM.from_pretrained(adapter_config["base_model_name_or_path"])
    base.resize_token_embeddings(AutoModelForCausalLM.from_pretrained(merged_dir).get_input_embeddings().num_embeddings)
    with_adapter = PeftModel.from_pretrained(base, lora_run / "final").eval()
    merged = AutoModelForCausalLM.from_pretrained(merged_dir).eval()
    assert not (merged_dir / "adapter_config.json").exists()
    question = [{"role": "user", "content": "What color is the cat?"}]
    encoded = tokenizer.apply_chat_template(question, add_generation_prompt=True, tokenize=True)
    ids = torch.tensor([encoded["input_ids"]])
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, with_adapter(ids).logits, atol=1e-4, rtol=1e-4)

    adapter_dir = tmp_path / "adapter"
    assert run_cli("export", lora_run, "--out", adapter_dir).exit_code == 0
    assert (adapter_dir / "adapter_config.json").is_file() and not (adapter_dir / "model.safetensors").exists()
    assert json.loads((adapter_dir / "export_report.json").read_text())["max_abs_logit_diff"] == 0.0
    full_run = run_cli("export", tmp_path / "merged", "--out", tmp_path / "again", "--merge-lora")
    assert_user_error(full_run, "not a LoRA adapter")


def render_ollama(template: str, messages: list[dict[str, str]]) -> str:
    """What Ollama makes of a `{{- range .Messages }}BODY{{ end }}PROMPT` template without conditions."""
    body, prompt = template.removeprefix("{{- range .Messages }}").split("{{ end }}")
    return (
        "".join(body.replace("{{ .Role }}", m["role"]).replace("{{ .Content }}", m["content"]) for m in messages)
        + prompt
    )


@pytest.mark.parametrize("name", ["chatml", "llama3"])
def test_ollama_gets_the_runs_template_and_stop_tokens(name: str, lora_run: Path, tmp_path: Path) -> None:
    from llmkit.export.gguf import ollama_modelfile

    conversation = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What color is the cat?"},
                    {"role": "assistant", "content": "Red."}, {"role": "user", "content": "And the dog?"}]  # fmt: skip
    if name == "chatml":  # the run's own export: the template it trained with, and its end-of-turn token
        result = run_cli("export", lora_run, "--out", tmp_path / "gguf", "--format", "gguf", "--dtype", "f16")
        assert result.exit_code == 0, result.stderr
        modelfile = (tmp_path / "gguf" / "Modelfile").read_text()
        tokenizer = AutoTokenizer.from_pretrained(lora_run / "final")
    else:
        tokenizer = AutoTokenizer.from_pretrained(lora_run / "final")
        chat = setup_chat_template(tokenizer, "llama3")
        modelfile = ollama_modelfile(tokenizer, list(chat.stop_token_ids))
    lines = modelfile.splitlines()
    assert "FROM ./model.gguf" in lines
    template = modelfile.split('TEMPLATE """', 1)[1].split('"""', 1)[0]
    expected = tokenizer.apply_chat_template(conversation, add_generation_prompt=True, tokenize=False)
    assert render_ollama(template, conversation) == expected
    stop = "<|im_end|>" if name == "chatml" else "<|eot_id|>"
    assert f'PARAMETER stop "{stop}"' in lines


def test_generate_and_chat_use_the_runs_template(lora_run: Path) -> None:
    answer = run_cli("generate", lora_run, "--prompt", "What color is the cat?", "--temperature", "0",
                     "--max-new-tokens", "6")  # fmt: skip
    assert answer.exit_code == 0, answer.stderr
    assert "<|im_start|>" not in answer.stdout and "What color" not in answer.stdout  # an answer, not an echo
    result = CliRunner().invoke(app, ["chat", str(lora_run), "--temperature", "0", "--max-new-tokens", "5"],
                                input="What color is the cat?\nAnd the dog?\n/exit\n")  # fmt: skip
    assert result.exit_code == 0, result.stderr
    assert result.stdout.count("model> ") == 2


def test_serve_answers_as_generate_for_a_lora_run(lora_run: Path, tmp_path: Path) -> None:
    """`llmkit serve` on a LoRA run merges the adapter into its base and answers as `llmkit generate` does: chat
    through the run's template, and raw text token for token."""
    from tests.test_serve import Server, greedy

    question, story = "What color is the cat?", "Once upon a time, the dog"
    expected = run_cli("generate", lora_run, "--prompt", question, "--temperature", "0", "--max-new-tokens", "8")
    assert expected.exit_code == 0, expected.stderr
    continued = greedy(lora_run, story, 8, raw=True)
    assert continued.strip()
    server = Server(lora_run, tmp_path / "requests.jsonl")
    try:
        client = server.client(None)
        answer = client.chat.completions.create(
            model="run", messages=[{"role": "user", "content": question}], max_tokens=8, temperature=0
        )
        assert answer.choices[0].message.content.strip() == expected.stdout.strip()
        text = client.completions.create(model="run", prompt=story, max_tokens=8, temperature=0)
        assert text.choices[0].text == continued
    finally:
        code, output = server.stop()
    assert code == 0, output


def test_eval_scores_a_lora_run(lora_run: Path, chat_rows: Path, tmp_path: Path) -> None:
    text_rows = tmp_path / "text.jsonl"
    text_rows.write_text(
        "".join(json.dumps({"text": f"The {a} is {c}."}) + "\n" for a, c in zip(ANIMALS, COLORS, strict=True))
    )
    result = run_cli("eval", lora_run, "--data", text_rows)
    assert result.exit_code == 0, result.stderr
    assert "perplexity" in result.stdout


# rsLoRA, LoRA+ and the warmup-stable-decay schedule: one setting each, resumed and merged like plain LoRA.
VARIANTS = ["--set", "finetune.lora.rslora=true", "--set", "finetune.lora.plus_ratio=16", "--set", "schedule.name=wsd",
            "--set", "schedule.decay_fraction=0.5"]  # fmt: skip


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_an_adapter_from_the_bases_own_components_saves_as_plain_lora(
    init: str, tiny_run: Path, tmp_path: Path
) -> None:
    """PiSSA and OLoRA move part of the base into the adapter; saved, the adapter applies to the original base
    and gives the model that trained (peft's conversion to rank 2r), and its first r factors are the trained ones."""
    from peft import get_peft_model_state_dict
    from safetensors.torch import load_file

    from llmkit.config import LoraConfig
    from llmkit.models import attach_lora, save_pretrained, trained_factors
    from tests.gpu_defaults import logits_of, plain_load

    model = attach_lora(plain_load(tiny_run / "final"), LoraConfig(r=4, init=init, dropout=0.0), "CAUSAL_LM", [])
    original = plain_load(tiny_run / "final").model.layers[0].self_attn.q_proj.weight
    assert not torch.equal(model.base_model.model.model.layers[0].self_attn.q_proj.base_layer.weight, original)
    with torch.no_grad():  # as if trained
        for name, parameter in model.named_parameters():
            if "lora_" in name:
                parameter.add_(0.05 * torch.randn_like(parameter))
    save_pretrained(model, tmp_path / "adapter")
    ids = torch.tensor([[1, 5, 9, 14, 20, 33, 41, 57]])
    loaded = plain_load(tmp_path / "adapter", base=tiny_run / "final")
    torch.testing.assert_close(logits_of(loaded, ids), logits_of(model.eval(), ids), atol=1e-4, rtol=1e-4)
    assert json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())["r"] == 8
    saved = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    trained = get_peft_model_state_dict(model)
    assert all(torch.equal(v, trained[k]) for k, v in trained_factors(saved, 4).items())


@pytest.mark.slow
@pytest.mark.parametrize("variant", [[], VARIANTS, ["--set", "finetune.lora.init=pissa"]],
                         ids=["lora", "rslora-loraplus-wsd", "pissa"])  # fmt: skip
def test_a_killed_lora_run_resumes_bitwise_exactly(
    variant: list[str], tiny_run: Path, chat_rows: Path, tmp_path: Path
) -> None:
    import os
    import signal
    import subprocess
    import sys

    from safetensors.torch import load_file

    args = ft_args(tiny_run, chat_rows, tmp_path / "run", "--method", "lora", "--set", "checkpoint.every_steps=4",
                   "--set", "train.grad_accum_steps=2", "--set", "logging.data_trace=true", *variant,
                   steps=10)  # fmt: skip
    reference = run_cli(*ft_args(tiny_run, chat_rows, tmp_path / "ref", *args[args.index("--method") :], steps=10))
    assert reference.exit_code == 0, reference.stderr
    env = {**os.environ, "LLMKIT_FAULT_INJECT": "kill@6.1", "PYTHONWARNINGS": "ignore"}
    killed = subprocess.run([sys.executable, "-m", "llmkit", *args], env=env, capture_output=True, timeout=300)
    assert killed.returncode == -signal.SIGKILL
    resumed = run_cli(*args, "--resume", "auto")
    assert resumed.exit_code == 0, resumed.stderr
    assert "step-00000004" in resumed.stdout
    final = load_file(tmp_path / "run" / "final" / "adapter_model.safetensors")
    expected = load_file(tmp_path / "ref" / "final" / "adapter_model.safetensors")
    assert final.keys() == expected.keys() and all(torch.equal(final[k], expected[k]) for k in final)
    trace = (tmp_path / "run" / "data_trace.jsonl").read_text()
    assert trace == (tmp_path / "ref" / "data_trace.jsonl").read_text()
    if not variant:
        return
    merged = run_cli("export", tmp_path / "run", "--out", tmp_path / "merged", "--merge-lora")  # its parity gate
    assert merged.exit_code == 0, merged.stderr
    adapter = json.loads((tmp_path / "run" / "final" / "adapter_config.json").read_text())
    if variant != VARIANTS:  # PiSSA: saved as plain LoRA of twice the rank, for the original base
        assert adapter["r"] == 32 and adapter["init_lora_weights"] is True
        return
    assert adapter["use_rslora"] is True
    groups = torch.load(tmp_path / "run" / "checkpoints" / "step-00000008" / "optimizer.pt")["param_groups"]
    faster = [g for g in groups if g["lr_scale"] == 16.0]
    assert faster and all(g["lr"] == pytest.approx(16 * groups[0]["lr"]) for g in faster)  # B matrices only
    lrs = [r["lr"] for r in map(json.loads, (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()) if "lr" in r]
    assert lrs[0] == pytest.approx(1e-3) and lrs[-1] < 1e-3  # stable at the peak, then decaying


@pytest.mark.parametrize("method, extra", [("lora", []), ("freeze", ["--set", "finetune.freeze_top_layers=1"])])
def test_frozen_weights_are_held_in_the_compute_dtype(
    method: str, extra: list[str], tiny_run: Path, chat_rows: Path, tmp_path: Path
) -> None:
    """bf16: the frozen base is held in bf16 (2 bytes a weight), the trained weights in float32 (4 bytes); the run
    trains (added template tokens included) and its summary loss is finite."""
    out = tmp_path / method
    result = run_cli(*ft_args(tiny_run, chat_rows, out, "--method", method, "--precision", "bf16", *extra, steps=6))
    assert result.exit_code == 0, result.stderr + result.stdout
    stats = json.loads((out / "data_stats.json").read_text())
    trainable, total = stats["trainable_parameters"], stats["total_parameters"]
    assert stats["trainable_bytes"] == 4 * trainable
    assert stats["frozen_bytes"] == 2 * (total - trainable) > 0
    assert "frozen weights" in result.stdout and "in bf16" in result.stdout
    assert math.isfinite(json.loads((out / "summary.json").read_text())["train_loss"])
