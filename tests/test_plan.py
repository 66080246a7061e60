"""llmkit plan: estimates checked against real models on CPU (parameters, weight/gradient/optimizer bytes, the
measured peak of a whole step)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from llmkit.config import load_config
from llmkit.data.tokenizer import train_bpe
from llmkit.flops import GIB, GPU_TYPES, count_parameters
from llmkit.models import Vocabulary, attach_lora, build_model
from llmkit.plan import ModelSize, estimate_memory, plan_run
from llmkit.train.memory import measure_step_peak
from tests.conftest import assert_user_error, run_cli

RECIPES = Path(__file__).parent.parent / "recipes"


@pytest.mark.parametrize("recipe", ["tiny-cpu.yaml", "gpt2-124m.yaml"])
def test_parameter_count_is_exact(recipe: str) -> None:
    cfg = load_config(RECIPES / recipe, ["data.vocab_size=1000"])
    plan = plan_run(cfg)
    tokenizer = type("Vocab", (), {"__len__": lambda self: 1000, "bos_token_id": 0, "eos_token_id": 0,
                                   "pad_token_id": 1})()  # fmt: skip
    model = build_model(cfg.model, tokenizer)
    assert plan.parameters == count_parameters(model)[1]
    assert plan.trainable == plan.parameters


def test_weight_gradient_and_optimizer_bytes_match_a_real_adamw_step() -> None:
    cfg = load_config(RECIPES / "tiny-cpu.yaml", ["data.vocab_size=1000"])
    tokenizer = train_bpe(["the cat sat on the mat"] * 50, 300)
    model = build_model(cfg.model, tokenizer)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    ids = torch.randint(0, 300, (2, 16))
    model(input_ids=ids, labels=ids).loss.backward()
    optimizer.step()
    unique = {id(p): p for p in model.parameters()}.values()
    weights = sum(p.numel() * p.element_size() for p in unique)
    gradients = sum(p.grad.numel() * p.grad.element_size() for p in unique)
    states = sum(t.numel() * t.element_size() for s in optimizer.state.values() for t in s.values() if t.dim() > 0)
    plan = plan_run(load_config(RECIPES / "tiny-cpu.yaml", [f"data.vocab_size={len(tokenizer)}"]))
    assert plan.memory.weights == weights
    assert plan.memory.gradients == gradients
    assert plan.memory.optimizer == states


@pytest.mark.parametrize("arch", ["llama", "gpt2"])  # GPT-2's projections are Conv1D, not Linear
def test_lora_trainable_count_matches_peft(arch: str, tmp_path: Path) -> None:
    sets = ["data.vocab_size=1000", f"model.arch={arch}", *(["model.n_kv_heads=null"] if arch == "gpt2" else [])]
    cfg = load_config(RECIPES / "tiny-cpu.yaml", sets)
    tokenizer = Vocabulary(1000)
    build_model(cfg.model, tokenizer).save_pretrained(tmp_path / "base")
    lora = load_config(RECIPES / "sft-lora.yaml", [f"model.init_from={tmp_path / 'base'}", "finetune.lora.r=4",
                                                   "finetune.max_length=128"])  # the base's context  # fmt: skip
    plan = plan_run(lora)
    peft_model = attach_lora(build_model(cfg.model, tokenizer), lora.finetune.lora, "CAUSAL_LM", [])
    assert plan.trainable == count_parameters(peft_model)[0]


def test_sharding_divides_what_each_strategy_shards() -> None:
    cfg = load_config(RECIPES / "llama-1b.yaml")
    n = 1_000_000
    size = ModelSize(n, n, n, 32000, cfg.model.n_layers, cfg.model.hidden_size)
    ddp, zero1, zero2, zero3, offload = (
        estimate_memory(cfg, size, strategy, 8, False, "pretrain")
        for strategy in ("ddp", "zero1", "zero2", "zero3", "zero3-offload")
    )
    assert (ddp.weights, ddp.gradients, ddp.optimizer) == (4 * n, 4 * n, 8 * n)
    assert zero1.optimizer == n and zero1.gradients == 4 * n
    assert zero2.gradients == n / 2 and zero2.weights == 4 * n
    assert zero3.weights == n / 2
    assert offload.weights == offload.optimizer == 0
    checkpointed = estimate_memory(cfg, size, "ddp", 8, True, "pretrain")
    assert checkpointed.activations < ddp.activations


# A small Llama-style model whose layers hold most of a step's memory, as in a real run: 4 x 256, 2 x 2 x 512 tokens
# (the plan is as close at 2 x 4 x 512; a CPU without AVX-512 runs bf16 matmuls 10-80x slower than float32).
MEASURED_SHAPE = ["model.hidden_size=256", "data.block_size=512", "model.context_length=512", "data.vocab_size=2048",
                  "train.micro_batch_size=2", "train.grad_accum_steps=2", "precision.dtype=bf16"]  # fmt: skip


@pytest.mark.parametrize(
    ("arch", "compiled", "settings"),
    [("llama", False, ()), ("qwen3", False, ()), ("gpt2", False, ()), ("llama", True, ()), ("gpt2", True, ()),
     ("llama", False, ("train.gradient_checkpointing=true",)),
     ("llama", False, ("train.grad_accum_steps=1", "train.micro_batch_size=1")),
     ("llama", False, ("model.attn_implementation=eager",))],
)  # fmt: skip
def test_memory_is_within_ten_percent_of_a_measured_step(
    arch: str, compiled: bool, settings: tuple[str, ...], tmp_path: Path
) -> None:
    """The peak of a real optimizer step (the run's model, loss, fused AdamW, bf16 autocast, two micro-batches),
    measured on the CPU as CUDA's allocator counts it on a GPU, against the plan less its CUDA context: eager (as
    DeepSpeed, FSDP and --no-compile run), compiled (the default on a GPU), with the recipe's gradient
    checkpointing (which the plan reads from the recipe, not only from --gradient-checkpointing), stepping
    after every micro-batch (gradients and activations are then never all alive at once), and with eager attention
    (its probabilities kept in every layer)."""
    sets = [*MEASURED_SHAPE, f"model.arch={arch}", f"train.compile={compiled}", f"data.dataset_dir={tmp_path}",
            *settings]  # fmt: skip
    cfg = load_config(RECIPES / "tiny-cpu.yaml", sets + (["model.n_kv_heads=null"] if arch == "gpt2" else []))
    plan = plan_run(cfg)
    assert plan.memory.held == pytest.approx(measure_step_peak(cfg, 2048), rel=0.10)


@pytest.mark.parametrize(
    ("arch", "method", "top_layers"), [("llama", "lora", 0), ("gpt2", "lora", 0), ("llama", "freeze", 2)]
)
def test_a_fine_tunes_memory_is_within_ten_percent_of_a_measured_step(
    arch: str, method: str, top_layers: int, tmp_path: Path
) -> None:
    """As above for fine-tuning a saved base: frozen weights in bf16, LoRA's adapters on every projection (GPT-2's
    Conv1D too), or only the top blocks trained (the frozen ones below are not recorded). LoRA without dropout: the
    CPU's dropout keeps a float32 mask where a GPU's keeps a byte per element."""
    shape = MEASURED_SHAPE[:3] + [f"model.arch={arch}", "model.tie_embeddings=false"]
    base = load_config(RECIPES / "tiny-cpu.yaml", shape + (["model.n_kv_heads=null"] if arch == "gpt2" else []))
    build_model(base.model, Vocabulary(2048)).save_pretrained(tmp_path / "base")
    cfg = load_config(RECIPES / "sft-lora.yaml", [
        f"model.init_from={tmp_path / 'base'}", "finetune.max_length=512", *MEASURED_SHAPE[4:], "train.compile=false",
        f"finetune.method={method}", "finetune.lora.dropout=0", f"finetune.freeze_top_layers={top_layers or 'null'}",
    ])  # fmt: skip
    plan = plan_run(cfg)
    assert plan.memory.held == pytest.approx(measure_step_peak(cfg, 2048, finetune=True), rel=0.10)


@pytest.mark.parametrize(
    ("recipe", "gpu_type", "gpus", "sets"),
    [
        ("gpt2-124m.yaml", "a10", 1, []),
        ("llama-1b.yaml", "h100", 8, []),
        ("llama-1b.yaml", "a100-40", 8, ["train.micro_batch_size=4", "train.grad_accum_steps=8"]),
        ("sft-lora.yaml", "a10", 1, []),
        ("dpo-lora.yaml", "a10", 1, []),
    ],
)
def test_the_gpu_recipes_fit_the_hardware_their_about_names(
    recipe: str, gpu_type: str, gpus: int, sets: list[str], tmp_path: Path
) -> None:
    """What each GPU recipe says it needs (24 GB, 8 x 80 GB or 40 GB at micro-batch 4), for its ~1B base where it
    fine-tunes one (TinyLlama's shape, from a config file: the hub is not reachable here)."""
    from transformers import LlamaConfig

    LlamaConfig(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
                num_attention_heads=32, num_key_value_heads=4, max_position_embeddings=2048,
                tie_word_embeddings=False).save_pretrained(tmp_path / "base")  # fmt: skip
    base = [f"model.init_from={tmp_path / 'base'}"] if "lora" in recipe else []
    cfg = load_config(RECIPES / recipe, [*base, *sets, f"data.dataset_dir={tmp_path}"])
    plan = plan_run(cfg, gpus=gpus, gpu_type=gpu_type)
    assert plan.fits, plan.suggestion
    assert str(GPU_TYPES[gpu_type][1] // GIB) in cfg.about


def test_time_and_cost_follow_the_stated_formula() -> None:
    cfg = load_config(RECIPES / "gpt2-124m.yaml", ["data.vocab_size=50257"])
    plan = plan_run(cfg, gpus=4, gpu_type="a100", mfu=0.5, price_per_gpu_hour=2.0)
    expected_hours = 10_000_000_000 * plan.flops_per_token / (4 * 312e12 * 0.5) / 3600
    assert plan.hours == pytest.approx(expected_hours)
    assert plan.cost == pytest.approx(expected_hours * 4 * 2.0)
    layers, seq, width = 12, 1024, 768
    assert plan.flops_per_token == 6 * plan.matmul_parameters + 12 * layers * seq * width
    assert plan.memory.total < 80 * GIB and plan.fits


def test_an_fp8_plan_says_what_it_assumes() -> None:
    def plan(precision: str):
        return plan_run(load_config(RECIPES / "tiny-cpu.yaml", [f"precision.dtype={precision}"]), gpus=1,
                        gpu_type="h100", mfu=0.4)  # fmt: skip

    fp8, bf16 = plan("fp8"), plan("bf16")
    assert fp8.memory == bf16.memory and fp8.hours == bf16.hours  # bf16's figures, and a note that says so
    assert any("precision fp8" in note and "bench/mfu.py --fp8" in note for note in fp8.notes)
    assert not any("fp8" in note for note in bf16.notes)


def test_plan_cli_prints_and_writes_json() -> None:
    text = run_cli(
        "plan", RECIPES / "llama-1b.yaml", "--gpus", "8", "--gpu-type", "a100-40", "--price-per-gpu-hour", "1.8"
    )
    assert text.exit_code == 0, text.stderr
    assert "suggestion" in text.stdout and "GiB" in text.stdout
    data = json.loads(run_cli("plan", RECIPES / "gpt2-124m.yaml", "--json").stdout)
    assert {"parameters", "flops_per_token", "memory", "hours", "suggestion", "by_strategy"} <= set(data)
    assert_user_error(run_cli("plan", RECIPES / "gpt2-124m.yaml", "--gpu-type", "tpu"), "--gpu-type tpu")
    assert_user_error(run_cli("plan", RECIPES / "gpt2-124m.yaml", "--mfu", "40"), "--mfu 40: give the fraction")
    assert_user_error(run_cli("plan", RECIPES / "gpt2-124m.yaml", "--gpus", "0"), "--gpus 0: must be at least 1")


@pytest.mark.parametrize("recipe", ["tiny-cpu.yaml", "gpt2-124m.yaml"])
def test_training_reports_the_plans_flops_and_mfu_counts_every_device(recipe: str) -> None:
    """The MFU a run reports uses the plan's 6N + attention on the real model; tokens/s is global, so the
    peak is that of all devices together (8 devices at 8x the tokens/s of one give the same MFU)."""
    from llmkit.flops import device_peak_flops, model_flops_per_token
    from llmkit.train.throughput import mfu

    cfg = load_config(RECIPES / recipe, ["data.vocab_size=1000"])
    tokenizer = type("Vocab", (), {"__len__": lambda self: 1000, "bos_token_id": 0, "eos_token_id": 0,
                                   "pad_token_id": 1})()  # fmt: skip
    model = build_model(cfg.model, tokenizer)
    assert model_flops_per_token(model, cfg.data.block_size) == plan_run(cfg).flops_per_token
    assert device_peak_flops("NVIDIA H100 80GB HBM3") == 989e12
    assert device_peak_flops("NVIDIA H100 PCIe") == 756e12 and device_peak_flops("NVIDIA H100 NVL") == 835e12
    assert device_peak_flops("NVIDIA A100-SXM4-40GB") == 312e12
    assert device_peak_flops("Tesla T4") is None
    assert device_peak_flops("NVIDIA B200") == device_peak_flops("NVIDIA GB200") == 2250e12
    assert device_peak_flops("NVIDIA GH200 480GB") == 989e12
    assert device_peak_flops("NVIDIA L40") == 181e12 and device_peak_flops("NVIDIA L4") == 121e12  # not the L4's
    assert device_peak_flops("NVIDIA GeForce RTX 4090") == 165e12
    assert mfu(8 * 100_000, 1e9, 989e12, devices=8) == pytest.approx(mfu(100_000, 1e9, 989e12, devices=1))
    assert mfu(395_600, 1e9, 989e12, devices=1) == pytest.approx(0.4)


def test_a_lora_plan_uses_the_base_models_shape_and_bf16_frozen_weights(tmp_path: Path) -> None:
    """A fine-tune's activations scale with the base model's layers and width, not the recipe's model section
    (which a fine-tune ignores); its frozen weights count 2 bytes in bf16, as training holds them."""
    from llmkit.models import place_weights

    cfg = load_config(RECIPES / "tiny-cpu.yaml", ["data.vocab_size=1000"])
    tokenizer = type("Vocab", (), {"__len__": lambda self: 1000, "bos_token_id": 0, "eos_token_id": 0,
                                   "pad_token_id": 1})()  # fmt: skip
    build_model(cfg.model, tokenizer).save_pretrained(tmp_path / "base")
    base = [f"model.init_from={tmp_path / 'base'}", "finetune.lora.r=4", "precision.dtype=bf16",
            "finetune.max_length=128"]  # the base's context  # fmt: skip
    plan = plan_run(load_config(RECIPES / "sft-lora.yaml", base))
    other_shape = plan_run(
        load_config(RECIPES / "sft-lora.yaml", [*base, "model.hidden_size=4096", "model.n_layers=48"])
    )
    assert plan.memory.activations == other_shape.memory.activations
    width, layers = cfg.model.hidden_size, cfg.model.n_layers
    lora = load_config(RECIPES / "sft-lora.yaml", base)
    seq, micro = lora.finetune.max_length, lora.train.micro_batch_size
    assert plan.memory.activations >= 34 * seq * micro * width * layers
    held = place_weights(attach_lora(build_model(cfg.model, tokenizer), lora.finetune.lora, "CAUSAL_LM", []),
                         torch.bfloat16)  # fmt: skip
    assert plan.memory.weights == held["trainable_bytes"] + held["frozen_bytes"]


def test_plan_knows_preference_tasks(tmp_path: Path) -> None:
    """A DPO row holds two answers, its logits are materialized, and the reference costs a pass, not memory."""
    cfg = load_config(RECIPES / "tiny-cpu.yaml", ["data.vocab_size=1000"])
    tokenizer = type("Vocab", (), {"__len__": lambda self: 1000, "bos_token_id": 0, "eos_token_id": 0,
                                   "pad_token_id": 1})()  # fmt: skip
    build_model(cfg.model, tokenizer).save_pretrained(tmp_path / "base")
    common = [f"model.init_from={tmp_path / 'base'}", "finetune.max_length=128"]
    sft = plan_run(load_config(RECIPES / "sft-lora.yaml", [*common, "finetune.task=sft"]))
    dpo = plan_run(load_config(RECIPES / "dpo-lora.yaml", [*common, "finetune.task=dpo"]))
    assert dpo.tokens_per_step == 2 * sft.tokens_per_step  # same micro-batch and accumulation in both recipes
    assert dpo.memory.activations > 2 * sft.memory.activations  # two answers per row, and whole logits
    assert dpo.memory.weights == sft.memory.weights  # no reference model held
    assert any("reference_logps.npy" in note for note in dpo.notes)


def test_plan_counts_grpos_answers_and_its_sampling(tmp_path: Path) -> None:
    """A GRPO prompt row becomes `generations` answer rows (tokens and activations), and sampling (and a KL's
    reference) are forward passes per token on top of training's FLOPs, once per num_iterations steps."""
    cfg = load_config(RECIPES / "tiny-cpu.yaml", ["data.vocab_size=1000"])
    tokenizer = type("Vocab", (), {"__len__": lambda self: 1000, "bos_token_id": 0, "eos_token_id": 0,
                                   "pad_token_id": 1})()  # fmt: skip
    build_model(cfg.model, tokenizer).save_pretrained(tmp_path / "base")
    common = [f"model.init_from={tmp_path / 'base'}", "finetune.max_length=128", "finetune.method=lora"]
    sft = plan_run(load_config(RECIPES / "sft-lora.yaml", [*common, "finetune.task=sft"]))
    grpo = [*common, "finetune.task=grpo", "finetune.grpo.generations=8"]
    plain = plan_run(load_config(RECIPES / "sft-lora.yaml", grpo))
    with_kl = plan_run(load_config(RECIPES / "sft-lora.yaml", [*grpo, "finetune.grpo.beta=0.04"]))
    assert plain.tokens_per_step == 8 * sft.tokens_per_step
    assert plain.memory.activations > 8 * sft.memory.activations  # eight answers per prompt, and whole logits
    forward = plain.flops_per_token - sft.flops_per_token
    assert forward >= 2 * plain.matmul_parameters  # sampling: one forward per token
    assert with_kl.flops_per_token - plain.flops_per_token == pytest.approx(forward)  # the reference: another
    assert any("memory-bound" in note for note in plain.notes)
    rounds = plan_run(load_config(RECIPES / "sft-lora.yaml", [*grpo, "finetune.grpo.beta=0.04",
                                                               "finetune.grpo.num_iterations=4"]))  # fmt: skip
    # sampling, the reference and the kept sampling log-probs: three forwards once per four steps
    assert rounds.flops_per_token - sft.flops_per_token == pytest.approx(3 / 4 * forward)
    assert any("num_iterations 4" in note for note in rounds.notes)
    full = [*grpo, "finetune.method=full", "precision.dtype=bf16"]
    full_kl = plan_run(load_config(RECIPES / "sft-lora.yaml", [*full, "finetune.grpo.beta=0.04"]))
    without = plan_run(load_config(RECIPES / "sft-lora.yaml", full))
    assert full_kl.memory.weights - without.memory.weights == 2 * full_kl.parameters  # a frozen bf16 copy


def test_plan_counts_a_live_teacher_and_the_disk_of_a_top_k_cache(tmp_path: Path) -> None:
    """A live teacher adds its weights, its logits and its forward FLOPs; a cached one adds none of them, and the
    plan states the cache's bytes on disk (tokens x k x (2-byte id + 2-byte log-prob) for a small vocabulary)."""
    from llmkit.train.distill import cache_bytes

    tokenizer = type("Vocab", (), {"__len__": lambda self: 1000, "bos_token_id": 0, "eos_token_id": 0,
                                   "pad_token_id": 1})()  # fmt: skip
    teacher_cfg = load_config(RECIPES / "tiny-cpu.yaml", ["model.hidden_size=256"])
    build_model(teacher_cfg.model, tokenizer).save_pretrained(tmp_path / "teacher")
    common = ["data.vocab_size=1000", f"data.dataset_dir={tmp_path / 'none'}"]
    alone = plan_run(load_config(RECIPES / "tiny-cpu.yaml", common))
    live = plan_run(load_config(RECIPES / "tiny-cpu.yaml", [*common, f"distill.teacher={tmp_path / 'teacher'}"]))
    teacher_params = sum(p.numel() for p in build_model(teacher_cfg.model, tokenizer).parameters())
    assert live.memory.weights - alone.memory.weights == pytest.approx(4.0 * teacher_params, rel=0.01)
    assert live.memory.activations > alone.memory.activations  # the student's and the teacher's whole logits
    matmul = teacher_params - 1024 * 256  # the tied embedding (1000 tokens padded to 1024) does no matmul
    assert live.flops_per_token - alone.flops_per_token >= 2 * matmul  # a forward pass per token
    cached = plan_run(load_config(RECIPES / "tiny-cpu.yaml", [*common, f"distill.teacher={tmp_path / 'teacher'}",
                                                             "distill.top_k=16", "train.max_steps=10"]))  # fmt: skip
    assert cached.memory.weights == alone.memory.weights and cached.flops_per_token == alone.flops_per_token
    assert any("top-16 cache" in note and "per training token" in note for note in cached.notes)
    assert cache_bytes(1000, 16, 1024) == 1000 * 16 * 4 and cache_bytes(1, 16, 128_256) == 16 * 6


def test_continued_pretraining_is_planned_as_pretraining_and_the_stage_can_be_named(tmp_path: Path) -> None:
    """tiny-cpu.yaml from its own saved weights is continued pretraining: the block length, activations and FLOPs
    of pretraining from scratch, not a fine-tune's (was 8x the activations); --stage finetune plans a fine-tune."""
    cfg = load_config(RECIPES / "tiny-cpu.yaml", ["data.vocab_size=1000"])
    tokenizer = type("Vocab", (), {"__len__": lambda self: 1000, "bos_token_id": 0, "eos_token_id": 0,
                                   "pad_token_id": 1})()  # fmt: skip
    build_model(cfg.model, tokenizer).save_pretrained(tmp_path / "base")
    continued_cfg = load_config(
        RECIPES / "tiny-cpu.yaml", ["data.vocab_size=1000", f"model.init_from={tmp_path / 'base'}"]
    )
    scratch, continued = plan_run(cfg), plan_run(continued_cfg)
    assert continued.memory.activations == scratch.memory.activations
    assert continued.flops_per_token == scratch.flops_per_token
    assert (
        continued.tokens_per_step
        == scratch.tokens_per_step
        == cfg.train.micro_batch_size * cfg.data.block_size * cfg.train.grad_accum_steps
    )
    assert any("continued pretraining" in note for note in continued.notes)
    finetune_cfg = load_config(
        RECIPES / "tiny-cpu.yaml",
        ["data.vocab_size=1000", f"model.init_from={tmp_path / 'base'}", "finetune.max_length=128"],
    )  # at most the base's context, as the run requires
    finetune = plan_run(finetune_cfg, stage="finetune")
    assert finetune.tokens_per_step == cfg.train.micro_batch_size * 128 * cfg.train.grad_accum_steps
    shown = json.loads(run_cli("plan", RECIPES / "tiny-cpu.yaml", "--set", f"model.init_from={tmp_path / 'base'}",
                               "--set", "finetune.max_length=128", "--stage", "finetune", "--json").stdout)  # fmt: skip
    assert shown["tokens_per_step"] == finetune.tokens_per_step
    # read as training reads it: a run directory means its final model, a LoRA run its base (both failed here)
    shutil.copytree(tmp_path / "base", tmp_path / "run" / "final")
    (tmp_path / "lora").mkdir()
    (tmp_path / "lora" / "adapter_config.json").write_text(
        json.dumps({"base_model_name_or_path": str(tmp_path / "base")})
    )
    for source in ("run", "lora"):
        other = load_config(RECIPES / "tiny-cpu.yaml", ["data.vocab_size=1000", f"model.init_from={tmp_path / source}",
                                                        "finetune.max_length=128"])  # fmt: skip
        assert plan_run(other, stage="finetune").parameters == finetune.parameters, source
    assert_user_error(run_cli("plan", RECIPES / "tiny-cpu.yaml", "--stage", "finetune"), "model.init_from")
    assert_user_error(run_cli("plan", RECIPES / "tiny-cpu.yaml", "--stage", "sft"), "--stage sft")
