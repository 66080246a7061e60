"""`llmkit export`: a standalone Hugging Face directory, checked against the source model.

The result loads with `AutoModelForCausalLM.from_pretrained` and `AutoTokenizer.from_pretrained` without
llmkit installed. Before it is moved into place, it is reloaded and its logits are compared with the
source model's on a fixed probe, and the comparison is saved as `export_report.json`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from llmkit.atomic import atomic_directory, write_json
from llmkit.data.tokenizer import load_tokenizer
from llmkit.errors import UserError
from llmkit.models import load_trained_model
from llmkit.runs import find_tokenizer_dir, resolve_model_dir

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# Largest logit difference accepted per dtype: float32 must round-trip exactly.
TOLERANCE = {"float32": 0.0, "bfloat16": 0.5, "float16": 0.05}


def export_hf(
    source: str | Path, out: str | Path, dtype: str = "float32", overwrite: bool = False, merge_lora: bool = False
) -> dict[str, Any]:
    """Write `source` (a run, checkpoint or model directory) as a standalone HF directory at `out`.

    A LoRA run exports as its PEFT adapter directory (which `peft` loads over the base model), or, with
    `merge_lora`, as a merged standalone model whose logits are checked against base + adapter.
    """
    if dtype not in DTYPES:
        raise UserError(f"--dtype {dtype}: choose one of {', '.join(DTYPES)}")
    out = Path(out)
    model_dir = resolve_model_dir(source)
    adapter = (model_dir / "adapter_config.json").is_file()
    if merge_lora and not adapter:
        raise UserError(f"--merge-lora: {model_dir} holds full model weights, not a LoRA adapter")
    if adapter and not merge_lora and dtype != "float32":
        raise UserError("--dtype applies to full or merged models; add --merge-lora to export this adapter as one")
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise UserError(f"{out}: already exists and is not empty; pass --overwrite to replace it")
    if out.resolve() == model_dir.resolve():
        raise UserError(f"{out}: is the source model itself; choose another --out")
    tokenizer = load_tokenizer(find_tokenizer_dir(model_dir))
    reference = load_trained_model(model_dir, dtype=torch.float32).eval()

    with atomic_directory(out) as staging:
        if adapter and not merge_lora:
            reference.save_pretrained(staging, safe_serialization=True)
        else:
            exported = load_trained_model(model_dir, dtype=DTYPES[dtype], merge=True)
            exported.save_pretrained(staging, safe_serialization=True)
        if getattr(reference, "generation_config", None) is not None:
            reference.generation_config.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        report = parity_report(reference, load_trained_model(staging, dtype=DTYPES[dtype]), dtype)
        report.update(
            source=str(model_dir),
            out=str(out),
            kind="adapter" if adapter and not merge_lora else ("merged" if merge_lora else "full"),
            size_bytes=sum(p.stat().st_size for p in staging.rglob("*.safetensors")),
        )
        # Merging changes the arithmetic (W + BA instead of Wx + B(Ax)): allow float rounding, no more.
        tolerance = TOLERANCE[dtype] + (1e-4 if merge_lora else 0.0)
        if report["max_abs_logit_diff"] > tolerance:
            raise UserError(
                f"{out}: exported logits differ from the source by {report['max_abs_logit_diff']:.3g} "
                f"(tolerance {tolerance:g} for {dtype}); nothing was written"
            )
        write_json(staging / "export_report.json", report)
    return report


@torch.no_grad()
def parity_report(reference: Any, exported: Any, dtype: str, probe_len: int = 64) -> dict[str, Any]:
    """Max absolute logit difference and greedy-token agreement on a seeded random probe."""
    generator = torch.Generator().manual_seed(0)
    vocab = reference.get_input_embeddings().weight.shape[0]
    probe = torch.randint(0, vocab, (2, probe_len), generator=generator)
    expected = reference(input_ids=probe).logits.float()
    actual = exported.eval()(input_ids=probe).logits.float()
    return {
        "dtype": dtype,
        "max_abs_logit_diff": float((expected - actual).abs().max()),
        "greedy_agreement": float((expected.argmax(-1) == actual.argmax(-1)).float().mean()),
        "probe_tokens": int(probe.numel()),
    }
