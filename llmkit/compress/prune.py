"""`llmkit prune`: a smaller model cut from a trained one, scored on calibration text, saved as a plain Hugging Face
model directory (config updated) that loads in transformers without llmkit.

* Depth: drop the blocks that change their input least. A block's influence is 1 - cos(input, output) of the
  hidden state at every calibration token, averaged (ShortGPT's Block Influence); the lowest go.
* Width (the Minitron recipe, Muralidharan et al. 2024), by activation importance on the calibration tokens:
  attention heads by the mean L2 norm of their output before o_proj (query heads, the same number kept in every
  key/value group, so grouped-query attention stays regular), MLP channels by the mean magnitude of their activation
  before down_proj, and hidden channels by the mean magnitude of every RMSNorm's output (the embedding, every
  projection's input or output and every norm are cut to the kept channels).

The cost is measured, not guessed: perplexity on held-out text before and after, in the report and the model card.
A pruned model is healed by distilling from the original (`llmkit pretrain --init-from PRUNED --teacher ORIGINAL`,
docs/compression.md). Width pruning covers Llama-architecture models; depth pruning also GPT-2.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from llmkit.atomic import atomic_directory, write_json, write_text
from llmkit.errors import UserError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase


@dataclass
class PruneSpec:
    """What to remove: explicit counts, or a parameter target reached along one axis."""

    drop_layers: int | None = None  # blocks to drop
    heads: int | None = None  # query heads to keep per layer
    mlp: int | None = None  # MLP channels to keep per layer
    hidden: int | None = None  # hidden channels to keep
    target_params: float | None = None  # a fraction (<= 1) of the model's parameters, or a count
    axis: str = "width"  # how a target is reached: width (MLP channels) or depth (blocks)


@dataclass
class Importance:
    blocks: list[float] = field(default_factory=list)  # block influence, per layer
    heads: list[np.ndarray] = field(default_factory=list)  # per layer, per query head
    mlp: list[np.ndarray] = field(default_factory=list)  # per layer, per channel
    hidden: np.ndarray | None = None  # per hidden channel


def layers_of(model: Any) -> Any:
    if model.config.model_type == "llama":
        return model.model.layers
    if model.config.model_type == "gpt2":
        return model.transformer.h
    raise UserError(f"llmkit prune handles Llama and GPT-2 models; this one is {model.config.model_type!r}")


@torch.no_grad()
def importance(model: Any, batches: list[torch.Tensor]) -> Importance:
    """Block influence and, for Llama, head / MLP-channel / hidden-channel activation importance."""
    layers = layers_of(model)
    llama = model.config.model_type == "llama"
    sums: dict[str, Any] = {"blocks": np.zeros(len(layers)), "tokens": 0}
    hooks = []

    def block_hook(index: int) -> Any:
        def hook(module: Any, args: tuple, kwargs: dict, output: Any) -> None:
            x = args[0] if args else kwargs["hidden_states"]
            y = output[0] if isinstance(output, tuple) else output
            cos = torch.nn.functional.cosine_similarity(x.float(), y.float(), dim=-1)
            sums["blocks"][index] += float((1 - cos).sum())

        return hook

    def add(key: str, index: int, values: torch.Tensor) -> None:
        store = sums.setdefault(key, {})
        store[index] = store.get(index, 0) + values.double().cpu().numpy()

    for index, layer in enumerate(layers):
        hooks.append(layer.register_forward_hook(block_hook(index), with_kwargs=True))
        if llama:
            head_dim = model.config.head_dim or model.config.hidden_size // model.config.num_attention_heads

            def heads_hook(module: Any, args: tuple, index: int = index, head_dim: int = head_dim) -> None:
                x = args[0].float()
                add("heads", index, x.reshape(*x.shape[:-1], -1, head_dim).norm(dim=-1).sum(dim=(0, 1)))

            def mlp_hook(module: Any, args: tuple, index: int = index) -> None:
                add("mlp", index, args[0].float().abs().sum(dim=(0, 1)))

            def norm_hook(module: Any, args: tuple, output: Any) -> None:
                add("hidden", 0, output.float().abs().sum(dim=(0, 1)))

            hooks.append(layer.self_attn.o_proj.register_forward_pre_hook(heads_hook))
            hooks.append(layer.mlp.down_proj.register_forward_pre_hook(mlp_hook))
            hooks.append(layer.input_layernorm.register_forward_hook(norm_hook))
            hooks.append(layer.post_attention_layernorm.register_forward_hook(norm_hook))
    try:
        model.eval()
        for ids in batches:
            model(input_ids=ids)
            sums["tokens"] += ids.numel()
    finally:
        for hook in hooks:
            hook.remove()
    tokens = max(sums["tokens"], 1)
    result = Importance(blocks=[float(b) / tokens for b in sums["blocks"]])
    if llama:
        result.heads = [sums["heads"][i] / tokens for i in range(len(layers))]
        result.mlp = [sums["mlp"][i] / tokens for i in range(len(layers))]
        result.hidden = sums["hidden"][0] / tokens
    return result


def parameters(model: Any) -> int:
    from llmkit.flops import count_parameters

    return count_parameters(model)[1]


def resolve(spec: PruneSpec, model: Any) -> PruneSpec:
    """Explicit counts from a parameter target: the fewest blocks (depth), or the widest MLP (width, in multiples
    of 32; of 8 below 256 channels) that brings the model to the target or under it."""
    if spec.target_params is None:
        return spec
    if any(v is not None for v in (spec.drop_layers, spec.heads, spec.mlp, spec.hidden)):
        raise UserError("--target-params picks the counts itself: drop --drop-layers/--heads/--mlp/--hidden")
    total = parameters(model)
    target = spec.target_params * total if spec.target_params <= 1 else spec.target_params
    # a count reads as one (1.5 is 2 parameters), so every refusal says what the target came to
    asked = f"--target-params {spec.target_params:g} ({target:,.0f} of the model's {total:,} parameters)"
    if target >= total:
        raise UserError(f"{asked}: nothing to remove; give a fraction below 1 or a smaller count")
    layers = layers_of(model)
    per_layer = sum(p.numel() for p in layers[0].parameters())
    if spec.axis == "depth":
        drop = math.ceil((total - target) / per_layer)
        if drop >= len(layers):
            raise UserError(f"{asked}: would drop every block; choose a larger target")
        return PruneSpec(drop_layers=max(drop, 0))
    if model.config.model_type != "llama":
        raise UserError("width pruning handles Llama-architecture models; use --axis depth for this one")
    width, hidden = model.config.intermediate_size, model.config.hidden_size
    per_channel = 3 * hidden * len(layers)  # gate and up rows, a down column, in every layer
    step = 32 if width >= 256 else 8  # channel counts the kernels like
    keep = math.floor((width - max(total - target, 0) / per_channel) / step) * step
    if keep < width // 4:
        raise UserError(
            f"{asked}: the MLP alone would keep {max(keep, 0)} of {width} channels "
            "(less than a quarter); give --heads and --hidden as well, or --axis depth"
        )
    return PruneSpec(mlp=keep)


def prune(model: Any, spec: PruneSpec, scores: Importance) -> dict[str, Any]:
    """Cut `model` in place as `spec` says, by `scores`; returns what was removed."""
    removed: dict[str, Any] = {}
    layers = layers_of(model)
    llama = model.config.model_type == "llama"
    if any(v is not None for v in (spec.heads, spec.mlp, spec.hidden)) and not llama:
        raise UserError("width pruning (--heads, --mlp, --hidden) handles Llama-architecture models; use --drop-layers")
    if spec.heads is not None:
        removed["heads"] = _prune_heads(model, spec.heads, scores)
    if spec.mlp is not None:
        removed["mlp_channels"] = _prune_mlp(model, spec.mlp, scores)
    if spec.hidden is not None:
        removed["hidden_channels"] = _prune_hidden(model, spec.hidden, scores)
    if spec.drop_layers:
        if not 0 < spec.drop_layers < len(layers):
            raise UserError(f"--drop-layers {spec.drop_layers}: the model has {len(layers)} blocks; keep at least one")
        order = np.argsort(scores.blocks, kind="stable")
        dropped = sorted(int(i) for i in order[: spec.drop_layers])
        kept = [layer for i, layer in enumerate(layers) if i not in dropped]
        _set_layers(model, kept)
        removed["blocks"] = {"dropped": dropped, "influence": [round(b, 6) for b in scores.blocks]}
    return removed


def _set_layers(model: Any, kept: list[Any]) -> None:
    count = len(kept)
    if model.config.model_type == "llama":
        model.model.layers = torch.nn.ModuleList(kept)
        for index, layer in enumerate(kept):
            layer.self_attn.layer_idx = index
        model.config.num_hidden_layers = count
        if getattr(model.config, "layer_types", None):
            model.config.layer_types = model.config.layer_types[:count]
    else:
        model.transformer.h = torch.nn.ModuleList(kept)
        for index, layer in enumerate(kept):
            layer.attn.layer_idx = index
        model.config.n_layer = count


def _linear(old: torch.nn.Linear, rows: torch.Tensor | None = None, cols: torch.Tensor | None = None) -> Any:
    weight = old.weight.data
    weight = weight[rows] if rows is not None else weight
    weight = weight[:, cols] if cols is not None else weight
    new = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=old.bias is not None, dtype=weight.dtype)
    new.weight.data = weight.clone()
    if old.bias is not None:
        new.bias.data = (old.bias.data[rows] if rows is not None else old.bias.data).clone()
    return new


def _prune_heads(model: Any, keep: int, scores: Importance) -> dict[str, Any]:
    """Multi-head attention: any number of heads, each with its key and value. Grouped-query attention: query heads
    only, the same number in every key/value group (the keys and values are shared, so they stay)."""
    config = model.config
    heads, groups = config.num_attention_heads, config.num_key_value_heads or config.num_attention_heads
    head_dim = config.head_dim or config.hidden_size // heads
    grouped = groups < heads
    if not 0 < keep <= heads or (grouped and keep % groups):
        rule = f"a multiple of the {groups} key/value groups, " if grouped else ""
        raise UserError(f"--heads {keep}: keep {rule}between 1 and the model's {heads} heads")
    per_group = heads // groups if grouped else 1
    kept_per_group = keep // groups if grouped else 1
    removed: dict[str, Any] = {}
    for index, layer in enumerate(layers_of(model)):
        if grouped:
            score = scores.heads[index].reshape(groups, per_group)
            chosen = [
                g * per_group + int(h)
                for g in range(groups)
                for h in sorted(np.argsort(-score[g], kind="stable")[:kept_per_group])
            ]
        else:
            chosen = sorted(int(h) for h in np.argsort(-scores.heads[index], kind="stable")[:keep])
        rows = torch.tensor([h * head_dim + d for h in chosen for d in range(head_dim)])
        attention = layer.self_attn
        attention.q_proj = _linear(attention.q_proj, rows=rows)
        attention.o_proj = _linear(attention.o_proj, cols=rows)
        if not grouped:
            attention.k_proj, attention.v_proj = (
                _linear(attention.k_proj, rows=rows),
                _linear(attention.v_proj, rows=rows),
            )
        attention.num_key_value_groups = kept_per_group
        removed[str(index)] = sorted(set(range(heads)) - set(chosen))
    config.num_attention_heads = keep
    if not grouped:
        config.num_key_value_heads = keep
    config.head_dim = head_dim  # no longer hidden_size // heads
    return removed


def _prune_mlp(model: Any, keep: int, scores: Importance) -> dict[str, int]:
    width = model.config.intermediate_size
    if not 0 < keep <= width:
        raise UserError(f"--mlp {keep}: keep between 1 and the model's {width} MLP channels")
    for index, layer in enumerate(layers_of(model)):
        rows = torch.from_numpy(np.sort(np.argsort(-scores.mlp[index], kind="stable")[:keep]))
        mlp = layer.mlp
        mlp.gate_proj, mlp.up_proj = _linear(mlp.gate_proj, rows=rows), _linear(mlp.up_proj, rows=rows)
        mlp.down_proj = _linear(mlp.down_proj, cols=rows)
    model.config.intermediate_size = keep
    return {"per_layer": width - keep}


def _prune_hidden(model: Any, keep: int, scores: Importance) -> dict[str, int]:
    config = model.config
    if not 0 < keep <= config.hidden_size:
        raise UserError(f"--hidden {keep}: keep between 1 and the model's {config.hidden_size} hidden channels")
    assert scores.hidden is not None
    config.head_dim = config.head_dim or config.hidden_size // config.num_attention_heads
    channels = torch.from_numpy(np.sort(np.argsort(-scores.hidden, kind="stable")[:keep]))
    tied = model.get_output_embeddings().weight is model.get_input_embeddings().weight
    embedding = model.get_input_embeddings()
    embedding.weight.data = embedding.weight.data[:, channels].clone()
    embedding.embedding_dim = keep
    norms = [model.model.norm]
    for layer in layers_of(model):
        attention, mlp = layer.self_attn, layer.mlp
        for name in ("q_proj", "k_proj", "v_proj"):
            setattr(attention, name, _linear(getattr(attention, name), cols=channels))
        attention.o_proj = _linear(attention.o_proj, rows=channels)
        mlp.gate_proj, mlp.up_proj = _linear(mlp.gate_proj, cols=channels), _linear(mlp.up_proj, cols=channels)
        mlp.down_proj = _linear(mlp.down_proj, rows=channels)
        norms += [layer.input_layernorm, layer.post_attention_layernorm]
    for norm in norms:
        norm.weight.data = norm.weight.data[channels].clone()
    if tied:
        model.lm_head.weight = embedding.weight
        model.lm_head.in_features = keep
    else:
        model.lm_head = _linear(model.lm_head, cols=channels)
    removed = config.hidden_size - keep
    config.hidden_size = keep
    return {"removed": removed}


# ------------------------------------------------------------------------------------------- text and the command
def calibration_text(
    data: str,
    tokenizer: PreTrainedTokenizerBase,
    context: int,
    batches: int,
    batch: int = 8,
    encoding: str | None = None,
) -> tuple[list, list]:
    """(calibration batches, held-out batches) of token ids: from a prepared dataset's train and val splits, or from
    the documents of a text file in `encoding` (the first four fifths calibrate, the rest measure)."""
    from llmkit.data.store import open_dataset

    path = Path(data)
    if (path / "manifest.json").is_file():
        if encoding:
            raise UserError(f"--encoding {encoding}: {data} is a prepared dataset, already tokenized; drop --encoding")
        dataset = open_dataset(path)
        train, val = dataset.split("train"), dataset.split("val")
        calibrate = [
            torch.from_numpy(train.blocks(np.arange(i, min(i + batch, len(train))))[:, :context])
            for i in range(0, min(len(train), batches * batch), batch)
        ]
        held_out = [
            torch.from_numpy(val.blocks(np.arange(i, min(i + batch, len(val))))[:, :context])
            for i in range(0, min(len(val), batches * batch), batch)
        ]
        return calibrate, held_out
    from llmkit.export.parity import probe_texts

    texts = probe_texts(data, count=batches * batch * 5 // 4 + 1, encoding=encoding)
    rows = [
        ids[:context] for ids in (tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts) if len(ids) > 1
    ]
    if len(rows) < 5:
        raise UserError(f"{data}: {len(rows)} documents; pruning needs at least 5 (4 to calibrate, 1 to measure)")
    cut = len(rows) * 4 // 5
    return list(_batches(rows[:cut], batch)), list(_batches(rows[cut:], batch))


def _batches(rows: list[list[int]], size: int) -> Iterator[torch.Tensor]:
    for start in range(0, len(rows), size):
        group = rows[start : start + size]
        width = min(len(r) for r in group)  # equal lengths: no padding to mask
        yield torch.tensor([r[:width] for r in group])


@torch.no_grad()
def perplexity(model: Any, batches: list[torch.Tensor]) -> float:
    total, count = 0.0, 0
    for ids in batches:
        logits = model(input_ids=ids).logits[:, :-1].float()
        loss = torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="sum"
        )
        total, count = total + float(loss), count + ids[:, 1:].numel()
    return math.exp(total / max(count, 1))


def open_source(source: str, out: Path, data: str | None, overwrite: bool) -> tuple[Path, Any, Any]:
    """(model directory, tokenizer, float32 model with any adapter merged) for a command that writes a smaller
    model to `out`, after the output checks every writing command makes."""
    from llmkit.data.tokenizer import load_tokenizer
    from llmkit.models import load_trained_model
    from llmkit.outputs import check_output, replaces
    from llmkit.runs import find_tokenizer_dir, resolve_model_dir

    model_dir = resolve_model_dir(source)
    check_output(out, [source, model_dir, data])
    replaces(out, overwrite)
    tokenizer = load_tokenizer(find_tokenizer_dir(model_dir))
    return model_dir, tokenizer, load_trained_model(model_dir, dtype=torch.float32, merge=True).eval()


def prune_model(
    source: str,
    out: Path,
    data: str,
    spec: PruneSpec,
    batches: int = 16,
    overwrite: bool = False,
    encoding: str | None = None,
) -> dict[str, Any]:
    """Load, score on calibration text, cut, check that the directory loads in plain transformers, and save."""
    from transformers import AutoModelForCausalLM

    from llmkit.models import model_context
    from llmkit.outputs import output_lock

    if spec.axis not in ("width", "depth"):
        raise UserError(f"--axis {spec.axis}: choose width or depth")
    if spec.target_params is not None and not spec.target_params > 0:
        raise UserError(f"--target-params {spec.target_params}: must be a positive fraction or count")
    if spec.target_params is None and all(v is None for v in (spec.drop_layers, spec.heads, spec.mlp, spec.hidden)):
        raise UserError("say what to remove: --target-params, or --drop-layers/--heads/--mlp/--hidden")
    if batches < 1:
        raise UserError(f"--batches {batches}: must be at least 1 (calibration batches of 8 sequences)")
    model_dir, tokenizer, model = open_source(source, out, data, overwrite)
    layers_of(model)
    spec = resolve(spec, model)
    calibrate, held_out = calibration_text(data, tokenizer, model_context(model) or 512, batches, encoding=encoding)
    before_params, before_ppl = parameters(model), perplexity(model, held_out)
    scores = importance(model, calibrate)
    removed = prune(model, spec, scores)
    after_params, after_ppl = parameters(model), perplexity(model, held_out)
    report = {
        "source": str(model_dir),
        "out": str(out),
        "spec": {k: v for k, v in spec.__dict__.items() if v is not None},
        "removed": removed,
        "parameters_before": before_params,
        "parameters_after": after_params,
        "parameter_fraction": after_params / before_params,
        "held_out_perplexity_before": before_ppl,
        "held_out_perplexity_after": after_ppl,
        "calibration": data,
        "calibration_tokens": int(sum(b.numel() for b in calibrate)),
        "held_out_tokens": int(sum(b.numel() for b in held_out)),
    }
    with output_lock(out), atomic_directory(out) as staging:
        model.save_pretrained(staging, safe_serialization=True)
        tokenizer.save_pretrained(staging)
        reloaded = AutoModelForCausalLM.from_pretrained(staging, dtype=torch.float32).eval()  # plain transformers
        if not torch.equal(reloaded(input_ids=held_out[0]).logits, model(input_ids=held_out[0]).logits):
            raise UserError(f"{out}: the saved model does not reload as the pruned one; nothing was written")
        write_json(staging / "prune_report.json", report)
        write_text(staging / "README.md", _card(out.name, report))
    return report


def _card(name: str, report: dict[str, Any]) -> str:
    removed = report["removed"]
    what = []
    if "blocks" in removed:
        what.append(
            f"blocks {removed['blocks']['dropped']} (lowest block influence; all: {removed['blocks']['influence']})"
        )
    if "heads" in removed:
        what.append(f"attention heads per layer {json.dumps(removed['heads'])}")
    if "mlp_channels" in removed:
        what.append(f"{removed['mlp_channels']['per_layer']} MLP channels in every layer")
    if "hidden_channels" in removed:
        what.append(f"{removed['hidden_channels']['removed']} hidden channels")
    return "\n".join(
        [
            f"# {name}",
            "",
            f"Pruned by llmkit from `{report['source']}`: a standard Hugging Face model directory "
            "(`AutoModelForCausalLM.from_pretrained` loads it; the config carries the new shape).",
            "",
            "## What was removed",
            "",
            *[f"- {line}" for line in what],
            "",
            "Scored on calibration text (`" + report["calibration"] + f"`, {report['calibration_tokens']:,} tokens).",
            "",
            "## What it cost",
            "",
            "| | before | after |",
            "| --- | ---: | ---: |",
            f"| parameters | {report['parameters_before']:,} | {report['parameters_after']:,} "
            f"({report['parameter_fraction']:.1%}) |",
            f"| held-out perplexity ({report['held_out_tokens']:,} tokens) "
            f"| {report['held_out_perplexity_before']:.4g} | {report['held_out_perplexity_after']:.4g} |",
            "",
            "Not healed yet: distill it from the original to recover (`llmkit pretrain --init-from THIS --teacher "
            "ORIGINAL --data DATA`, docs/compression.md).",
            "",
        ]
    )
