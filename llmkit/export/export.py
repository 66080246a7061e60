"""`llmkit export`: the trained model in the format a serving stack wants, checked against the source.

* `hf`: a standalone Hugging Face directory (safetensors; float32, bfloat16 or float16) that loads with
  `AutoModelForCausalLM` without llmkit; a LoRA run exports as its PEFT adapter, or merged with --merge-lora.
* `gguf`: one `model.gguf` for llama.cpp (Llama or GPT-2; f32, f16, q8_0, q5_1, q5_0, q4_1, q4_0, and the
  k-quants through llama.cpp's quantizer), tokenizer inside.
* `onnx`: `model.onnx` for onnxruntime (float32, or `--quantize int8` for CPU inference).
* `hf --quantize int8|int4`: weight-only int8 through torchao (`TorchAoConfig`), or 4-bit NF4 through bitsandbytes,
  saved as safetensors that transformers loads (with that library installed).

Every export is built in a staging directory, run by its own runtime on a probe set and compared with the
source (llmkit.export.parity); only an export within tolerance is moved into place, with its parity report
(`export_report.json`) and a model card (`README.md`).

`--ladder` (GGUF) exports every quantization level, measures each on the probe (size, perplexity change, greedy
agreement, and tokens/s in llama.cpp when llama-cpp-python is installed), holds them all to one bar and keeps the
smallest level inside it; the whole table goes into the report and the model card.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from llmkit.atomic import atomic_directory, write_json, write_text
from llmkit.data.tokenizer import load_tokenizer
from llmkit.errors import GATE_FAILED_EXIT, UserError
from llmkit.export.card import eval_report_metrics, find_run_files, model_card
from llmkit.export.formats import FORMATS, Written, check_quantizer, model_logits
from llmkit.export.gguf import K_QUANTS, llama_cpp_missing
from llmkit.export.parity import BUILTIN_PROBE, Probe, Tolerance, failures, measure, probe_batch, probe_texts
from llmkit.hub import check_push, push_folder
from llmkit.models import load_trained_model
from llmkit.outputs import check_output, output_lock, replaces
from llmkit.runs import find_tokenizer_dir, refuse_scoring_model, resolve_model_dir


class ParityFailed(UserError):
    """The export runs but behaves unlike the source beyond the tolerance: a failed check (exit 1)."""

    exit_code = GATE_FAILED_EXIT


def export_model(
    source: str | Path,
    out: str | Path,
    fmt: str = "hf",
    dtype: str | None = None,
    quantize: str | None = None,
    overwrite: bool = False,
    merge_lora: bool = False,
    tolerance: dict[str, float | None] | None = None,
    eval_report: Path | None = None,
    probe_data: str | None = None,
    probe_encoding: str | None = None,
    ladder: bool = False,
    push_to_hub: str | None = None,
    public: bool = False,
) -> dict[str, Any]:
    dtype = _check_request(fmt, dtype, quantize, ladder, tolerance)
    if probe_encoding and not probe_data:
        raise UserError(f"--encoding {probe_encoding} is the encoding of --probe-data: give --probe-data too")
    if public and not push_to_hub:
        raise UserError("--public makes the uploaded repository public: it goes with --push-to-hub OWNER/NAME")
    out = Path(out)
    model_dir = resolve_model_dir(source)
    refuse_scoring_model(model_dir, "exported yet (its scoring head would be lost)")
    adapter = (model_dir / "adapter_config.json").is_file()
    if merge_lora and not adapter:
        raise UserError(f"--merge-lora: {model_dir} holds full model weights, not a LoRA adapter")
    merge = merge_lora or (adapter and fmt != "hf")  # GGUF and ONNX need one whole model
    if adapter and not merge and dtype != "float32":
        raise UserError("--dtype applies to full or merged models; add --merge-lora to export this adapter as one")
    check_output(out, [source, model_dir, eval_report, probe_data])
    replaces(out, overwrite)
    evaluation = eval_report or find_run_files(model_dir).get("eval.json")  # what the model card will show
    if evaluation is not None:
        eval_report_metrics(evaluation)
    if push_to_hub:
        check_push(push_to_hub)
    probe = Probe(probe_texts(probe_data, encoding=probe_encoding), probe_data or BUILTIN_PROBE)
    with output_lock(out):
        if ladder:
            report = _export_ladder(model_dir, out, tolerance, eval_report, probe)
        else:
            report = _export(model_dir, out, fmt, dtype, quantize, adapter, merge, tolerance, eval_report, probe)
    if push_to_hub:  # only an export that passed its parity check is on disk to be pushed
        url = push_folder(out, push_to_hub, private=not public)
        report["pushed"] = {"repo": push_to_hub, "private": not public, "commit": url}
    return report


def _check_request(
    fmt: str, dtype: str | None, quantize: str | None, ladder: bool, tolerance: dict[str, float | None] | None
) -> str:
    """The format, precision, quantizer and tolerances asked for, checked before any work; the dtype to write."""
    if ladder and (fmt != "gguf" or dtype is not None or quantize):
        raise UserError("--ladder measures every GGUF level and keeps one: pass --format gguf and no --dtype")
    if fmt not in FORMATS:
        raise UserError(f"--format {fmt}: choose one of {', '.join(FORMATS)}")
    record = FORMATS[fmt]
    dtype = dtype or record.default_dtype
    if dtype not in record.dtypes:
        raise UserError(f"--dtype {dtype}: --format {fmt} takes {', '.join(record.dtypes)}")
    if quantize not in (None, "int8", "int4"):
        raise UserError(f"--quantize {quantize}: choose int8 or int4; GGUF levels are --dtype q8_0 ... q4_0")
    if quantize and quantize not in record.quantizers:
        raise UserError(
            "--quantize int8 applies to --format hf (torchao) and onnx, int4 to --format hf "
            "(bitsandbytes NF4); GGUF has --dtype q8_0 ... q4_0"
        )
    if quantize and fmt == "hf":
        check_quantizer(quantize, dtype)
    if fmt == "gguf" and dtype in K_QUANTS and llama_cpp_missing():
        raise UserError(f"--dtype {dtype}: {llama_cpp_missing()}; q8_0, q5_1, q5_0, q4_1 and q4_0 need nothing more")
    _check_tolerance(tolerance or {})
    return dtype


def _check_tolerance(tolerance: dict[str, float | None]) -> None:
    for key, value in tolerance.items():  # checked where they enter, before any work
        if value is not None and (not 0 <= value < float("inf") or (key == "min_greedy_agreement" and value > 1)):
            raise UserError(f"--{key.replace('_', '-')} {value}: must be a finite number >= 0 (an agreement at most 1)")


def _export(
    model_dir: Path,
    out: Path,
    fmt: str,
    dtype: str,
    quantize: str | None,
    adapter: bool,
    merge: bool,
    tolerance: dict[str, float | None] | None,
    eval_report: Path | None,
    probe: Probe,
) -> dict[str, Any]:
    tokenizer = load_tokenizer(find_tokenizer_dir(model_dir))
    reference = load_trained_model(model_dir, dtype=torch.float32).eval()
    if fmt == "gguf":
        from llmkit.export.gguf import check_gguf_supported

        check_gguf_supported(reference)
    record = FORMATS[fmt]
    precision = record.precision(dtype, quantize)
    limits = Tolerance.default(precision)
    for key, value in (tolerance or {}).items():
        if value is not None:
            setattr(limits, key, value)
    if merge:  # merging changes the arithmetic (W + BA instead of Wx + B(Ax)): allow float rounding, no more
        limits.max_logit_diff += 1e-4
    ids, mask = probe_batch(tokenizer, probe.texts)

    with atomic_directory(out) as staging:
        exported = record.writer(
            Written(model_dir, staging, tokenizer, dtype, quantize, adapter and not merge, out.name)
        )
        report = measure(model_logits(reference), exported, ids, mask)
        report.update(
            format=fmt,
            precision=precision,
            source=str(model_dir),
            out=str(out),
            kind="adapter" if adapter and not merge else ("merged" if merge else "full"),
            size_bytes=sum(p.stat().st_size for p in staging.iterdir() if p.suffix == record.weights),
            files=sorted(p.name for p in staging.iterdir()),
            tolerance=limits.__dict__,
            probe=probe.name,
        )
        problems = failures(report, limits)
        if problems:
            raise ParityFailed(
                f"{out}: the {fmt} export does not behave like the source: {'; '.join(problems)}; nothing was "
                "written (loosen with --max-logit-diff, --min-greedy-agreement or --max-ppl-increase)"
            )
        write_json(staging / "export_report.json", report)
        write_text(staging / "README.md", model_card(out.name, model_dir, report, eval_report))
    return report


LADDER = ("f16", "q8_0", "q6_k", "q5_k_m", "q5_1", "q5_0", "q4_k_m", "q4_1", "q4_0", "q3_k_m", "q2_k")
LADDER_BAR = Tolerance(max_logit_diff=float("inf"), min_greedy_agreement=0.9, max_ppl_increase=0.05)


def _export_ladder(
    model_dir: Path,
    out: Path,
    tolerance: dict[str, float | None] | None,
    eval_report: Path | None,
    probe: Probe,
) -> dict[str, Any]:
    """Every GGUF level measured against the source; the smallest one inside the bar is written to `out`."""
    import shutil

    from llmkit.console import info
    from llmkit.export.gguf import check_gguf_supported

    tokenizer = load_tokenizer(find_tokenizer_dir(model_dir))
    reference = load_trained_model(model_dir, dtype=torch.float32, merge=True).eval()
    check_gguf_supported(reference)
    bar = Tolerance(**LADDER_BAR.__dict__)
    for key, value in (tolerance or {}).items():
        if value is not None:
            setattr(bar, key, value)
    ids, mask = probe_batch(tokenizer, probe.texts)
    skipped = llama_cpp_missing()
    levels = [level for level in LADDER if not (skipped and level in K_QUANTS)]
    if skipped:
        info(f"ladder: {skipped}; measuring {', '.join(levels)}")
    rows: list[dict[str, Any]] = []
    with atomic_directory(out) as staging:
        for level in levels:
            folder = staging / f".{level}"
            folder.mkdir()
            exported = FORMATS["gguf"].writer(Written(model_dir, folder, tokenizer, level, name=out.name))
            row = {"level": level, **measure(model_logits(reference), exported, ids, mask)}
            row["size_bytes"] = (folder / "model.gguf").stat().st_size
            row["tokens_per_second"] = llama_cpp_speed(folder / "model.gguf", ids[0, :16].tolist())
            row["within"] = not failures(row, bar)
            rows.append(row)
            info(
                f"ladder: {level:7} {row['size_bytes'] / 2**20:8.2f} MiB, greedy agreement "
                f"{row['greedy_agreement']:.1%}, perplexity {row['perplexity_increase']:+.2%}"
                f"{'' if row['within'] else ' (outside the bar)'}"
            )
        inside = [row for row in rows if row["within"]]
        if not inside:
            raise ParityFailed(
                f"{out}: no GGUF level stays within the bar (greedy agreement >= {bar.min_greedy_agreement:g}, "
                f"perplexity within +-{bar.max_ppl_increase:.0%}); nothing was written (loosen with "
                "--min-greedy-agreement or --max-ppl-increase)"
            )
        best = min(inside, key=lambda row: row["size_bytes"])
        for kept in (staging / f".{best['level']}").iterdir():  # the file, its config and tokenizer
            kept.rename(staging / kept.name)
        for level in levels:
            shutil.rmtree(staging / f".{level}")
        report = {key: value for key, value in best.items() if key not in ("level", "within")}
        report.update(
            format="gguf",
            precision=best["level"],
            source=str(model_dir),
            out=str(out),
            kind="full",
            files=sorted([p.name for p in staging.iterdir()] + ["export_report.json", "README.md"]),
            tolerance=bar.__dict__,
            probe=probe.name,
            ladder=rows,
            recommended=best["level"],
            ladder_note=skipped,
        )
        write_json(staging / "export_report.json", report)
        write_text(staging / "README.md", model_card(out.name, model_dir, report, eval_report))
    return report


def llama_cpp_speed(path: Path, prompt: list[int], new_tokens: int = 48) -> float | None:
    """Greedy decoding speed of a GGUF file in llama.cpp (tokens/s), None without llama-cpp-python."""
    if llama_cpp_missing():
        return None
    import time

    from llama_cpp import Llama

    from llmkit.export.gguf import quiet_native_stderr

    with quiet_native_stderr():
        llm = Llama(model_path=str(path), n_ctx=len(prompt) + new_tokens, verbose=False)
        start = time.perf_counter()
        result = llm.create_completion(prompt, max_tokens=new_tokens, temperature=0.0)
        seconds = time.perf_counter() - start
    return result["usage"]["completion_tokens"] / seconds if seconds > 0 else None
