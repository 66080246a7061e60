"""Every export format of one trained run: size, parity with the source, and CPU inference speed.

    python bench/export_formats.py [--run demo-out/run]    (run `make demo` first for the default)

Exports hf (float32, bfloat16), gguf (f32, f16, q8_0) and onnx (float32, int8) with `llmkit export`, prints
each parity report (max logit difference, greedy agreement, perplexity change on an in-domain probe: 32 held-out
stories) and the file
size, then times a forward pass over a batch of 8 x 128 tokens on the CPU: PyTorch float32 (transformers) against
onnxruntime float32 and int8, in the same run, and prints the ratios.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch
from _cli import scratch  # bench/_cli.py (run as python bench/NAME.py)

from llmkit.export.export import export_model
from llmkit.export.onnx import onnx_logits

EXPORTS = [("hf", "float32", None), ("hf", "bfloat16", None), ("gguf", "f32", None), ("gguf", "f16", None),
           ("gguf", "q8_0", None), ("onnx", "float32", None), ("onnx", "float32", "int8")]  # fmt: skip


def timed(fn, repeats: int = 7) -> float:
    fn()  # warm-up
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", default="demo-out/run")
    parser.add_argument("--probe", default="recipes/tasks/stories-sample.jsonl", help="in-domain probe text")
    args = parser.parse_args()
    work = scratch("llmkit-export-bench-")
    reports = {}
    print(f"{'format':<22}{'size MiB':>10}{'max |dlogit|':>14}{'greedy':>9}{'ppl change':>12}")
    for fmt, dtype, quantize in EXPORTS:
        label = f"{fmt} {quantize or dtype}"
        out = work / label.replace(" ", "-")
        # A benchmark measures every format: tolerances open (the largest finite ones), so nothing is refused.
        report = export_model(args.run, out, fmt=fmt, dtype=dtype, quantize=quantize, probe_data=args.probe,
                              tolerance={"max_logit_diff": sys.float_info.max, "min_greedy_agreement": 0.0,
                                         "max_ppl_increase": sys.float_info.max})  # fmt: skip
        reports[label] = {**report, "dir": out}
        print(f"{label:<22}{report['size_bytes'] / 2**20:>10.2f}{report['max_abs_logit_diff']:>14.3g}"
              f"{report['greedy_agreement']:>9.1%}{report['perplexity_increase']:>+12.3%}")  # fmt: skip

    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    ids = torch.randint(0, 400, (8, 128))
    mask = torch.ones_like(ids)
    model = AutoModelForCausalLM.from_pretrained(reports["hf float32"]["dir"]).eval()
    with torch.no_grad():
        torch_s = timed(lambda: model(input_ids=ids, attention_mask=mask))
    ort_fp32 = onnx_logits(reports["onnx float32"]["dir"] / "model.onnx")
    ort_int8 = onnx_logits(reports["onnx int8"]["dir"] / "model.onnx")
    fp32_s, int8_s = timed(lambda: ort_fp32(ids, mask)), timed(lambda: ort_int8(ids, mask))
    tokens = ids.numel()
    print(f"\nCPU forward, batch 8 x 128 ({torch.get_num_threads()} threads), median of 7:")
    print(f"  transformers float32  {tokens / torch_s:>10,.0f} tokens/s")
    print(f"  onnxruntime float32   {tokens / fp32_s:>10,.0f} tokens/s  ({torch_s / fp32_s:.2f}x transformers)")
    print(f"  onnxruntime int8      {tokens / int8_s:>10,.0f} tokens/s  ({torch_s / int8_s:.2f}x transformers)")
    size = {k: v["size_bytes"] for k, v in reports.items()}
    print(f"\nint8 ONNX is {size['onnx int8'] / size['onnx float32']:.2f}x the size of float32 ONNX; "
          f"q8_0 GGUF is {size['gguf q8_0'] / size['gguf f32']:.2f}x f32 GGUF")  # fmt: skip
    print(json.dumps({k: {m: v[m] for m in ("size_bytes", "max_abs_logit_diff", "greedy_agreement",
                                            "perplexity_increase")} for k, v in reports.items()}))  # fmt: skip


if __name__ == "__main__":
    main()
