"""`llmkit export --format hf|gguf|onnx`: files read back by their own readers and runtimes, parity reports, cards."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM, AutoTokenizer, MistralConfig, Phi3Config

from tests.conftest import assert_nothing_written, assert_user_error, pretrained, run_cli


@pytest.mark.parametrize(("dtype", "tensor_type", "atol"),
                         [("f32", "F32", 0.0), ("f16", "F16", 1e-3), ("bf16", "BF16", 4e-3), ("q8_0", "Q8_0", 2e-3),
                          ("q5_1", "Q5_1", 0.04), ("q4_0", "Q4_0", 0.07)])  # fmt: skip
def test_gguf_reads_back_as_the_trained_model(
    tiny_run: Path, tmp_path: Path, dtype: str, tensor_type: str, atol: float
):
    gguf = pytest.importorskip("gguf")
    from llmkit.export.gguf import gguf_name

    out = tmp_path / dtype
    result = run_cli("export", tiny_run, "--out", out, "--format", "gguf", "--dtype", dtype)
    assert result.exit_code == 0, result.stderr
    reader = gguf.GGUFReader(str(out / "model.gguf"))
    tokenizer = AutoTokenizer.from_pretrained(tiny_run / "final")
    model = AutoModelForCausalLM.from_pretrained(tiny_run / "final")

    def text(key: str) -> str:
        field = reader.fields[key]
        return bytes(field.parts[field.data[0]]).decode()

    assert text("general.architecture") == "llama" and text("tokenizer.ggml.model") == "gpt2"
    tokens = [bytes(reader.fields["tokenizer.ggml.tokens"].parts[i]).decode()
              for i in reader.fields["tokenizer.ggml.tokens"].data]  # fmt: skip
    assert all(tokens[i] == token for token, i in tokenizer.get_vocab().items())
    merges = json.loads(tokenizer.backend_tokenizer.to_str())["model"]["merges"]
    assert len(reader.fields["tokenizer.ggml.merges"].data) == len(merges)
    eos = reader.fields["tokenizer.ggml.eos_token_id"]
    assert int(eos.parts[eos.data[0]][0]) == tokenizer.eos_token_id

    # Every tensor, dequantized, equals the trained one (q/k compared in llama.cpp's rotary order).
    heads, kv = model.config.num_attention_heads, model.config.num_key_value_heads
    state = model.state_dict()
    types = set()
    for tensor in reader.tensors:
        types.add(tensor.tensor_type.name)
        name = next(n for n in state if gguf_name(n) == tensor.name)
        expected = state[name].numpy()
        if name.endswith(("q_proj.weight", "k_proj.weight")):
            h = heads if "q_proj" in name else kv
            expected = expected.reshape(h, 2, -1, expected.shape[1]).swapaxes(1, 2).reshape(expected.shape)
        actual = gguf.quants.dequantize(tensor.data, tensor.tensor_type).reshape(expected.shape)
        assert np.abs(actual - expected).max() <= atol * max(1.0, np.abs(expected).max()), tensor.name
    assert tensor_type in types and "lm_head" not in str(types)
    report = json.loads((out / "export_report.json").read_text())
    assert report["format"] == "gguf" and report["precision"] == (
        {"f32": "float32", "f16": "float16", "bf16": "bfloat16"}.get(dtype, dtype)
    )
    assert report["greedy_agreement"] >= (1.0 if dtype == "f32" else report["tolerance"]["min_greedy_agreement"])
    assert report["max_abs_logit_diff"] <= (
        1e-5 if dtype == "f32" else 1.0 if dtype in ("f16", "bf16", "q8_0") else 5.0
    )


@pytest.mark.parametrize(
    ("quantize", "library", "method", "layer_type"),
    [("int8", "torchao", "torchao", "Int8"), ("int4", "bitsandbytes", "bitsandbytes", "Params4bit")],
)
def test_hf_weight_only_checkpoints_load_in_plain_transformers(
    wide_run: Path, tmp_path: Path, quantize: str, library: str, method: str, layer_type: str
) -> None:
    pytest.importorskip(library)
    out = tmp_path / quantize
    result = run_cli("export", wide_run, "--out", out, "--quantize", quantize)
    assert result.exit_code == 0, result.stderr
    assert json.loads((out / "config.json").read_text())["quantization_config"]["quant_method"] == method
    model = AutoModelForCausalLM.from_pretrained(out)  # transformers + the library, no llmkit
    assert layer_type in type(model.model.layers[0].mlp.up_proj.weight).__name__
    report = json.loads((out / "export_report.json").read_text())
    assert report["precision"] == quantize
    assert report["greedy_agreement"] >= report["tolerance"]["min_greedy_agreement"]
    full = sum(p.numel() * 4 for p in AutoModelForCausalLM.from_pretrained(wide_run / "final").parameters())
    assert report["size_bytes"] < full
    assert not list(out.glob(".*"))  # the float32 staging copy is gone


@pytest.fixture(scope="module")
def wide_run(tiny_dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny run 64 wide: bitsandbytes quantizes 4-bit weights in blocks of 64 inputs."""
    return pretrained(tiny_dataset, tmp_path_factory, "wide", "model.hidden_size=64")


def test_int4_refuses_layers_narrower_than_a_4bit_block(tiny_run: Path, tmp_path: Path) -> None:
    """32 inputs quantize, but bitsandbytes' CPU kernel (AVX512-BF16) cannot run them: one line, on every machine."""
    pytest.importorskip("bitsandbytes")
    result = run_cli("export", tiny_run, "--out", tmp_path / "int4", "--quantize", "int4")
    assert_user_error(result, "--quantize int4", "32 inputs", "block of 64", "--quantize int8")
    assert_nothing_written(tmp_path, "int4")


@pytest.fixture(scope="module")
def gpt2_model(tiny_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A randomly initialized GPT-2 on the tiny run's tokenizer (the export only needs its architecture)."""
    from llmkit.config import load_config
    from llmkit.models import build_model

    out = tmp_path_factory.mktemp("gpt2") / "model"
    tokenizer = AutoTokenizer.from_pretrained(tiny_run / "final")
    cfg = load_config(None, ["model.arch=gpt2", "model.n_layers=2", "model.hidden_size=64", "model.n_heads=4"])
    torch.manual_seed(0)
    build_model(cfg.model, tokenizer).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def test_gpt2_gguf_has_llama_cpps_names_and_reads_back_as_the_model(gpt2_model: Path, tmp_path: Path) -> None:
    gguf = pytest.importorskip("gguf")
    result = run_cli("export", gpt2_model, "--out", tmp_path / "g", "--format", "gguf", "--dtype", "f32")
    assert result.exit_code == 0, result.stderr
    reader = gguf.GGUFReader(str(tmp_path / "g" / "model.gguf"))
    arch = reader.fields["general.architecture"]
    assert bytes(arch.parts[arch.data[0]]).decode() == "gpt2"
    names = {tensor.name: tensor for tensor in reader.tensors}
    assert {
        "token_embd.weight",
        "position_embd.weight",
        "blk.1.attn_qkv.weight",
        "blk.1.ffn_down.bias",
        "output_norm.weight",
    } <= set(names) and "output.weight" not in names  # tied head: token_embd reused
    state = AutoModelForCausalLM.from_pretrained(gpt2_model).state_dict()
    qkv = names["blk.0.attn_qkv.weight"]
    data = gguf.quants.dequantize(qkv.data, qkv.tensor_type).reshape(tuple(reversed(qkv.shape.tolist())))
    assert np.array_equal(data, state["transformer.h.0.attn.c_attn.weight"].numpy().T)  # Conv1D -> [out, in]
    report = json.loads((tmp_path / "g" / "export_report.json").read_text())
    assert report["max_abs_logit_diff"] <= 1e-5 and report["greedy_agreement"] == 1.0


def test_the_ladder_keeps_the_smallest_level_inside_one_bar(tiny_run: Path, tmp_path: Path) -> None:
    from llmkit.export.gguf import llama_cpp_missing

    out = tmp_path / "ladder"
    result = run_cli("export", tiny_run, "--out", out, "--format", "gguf", "--ladder")
    assert result.exit_code == 0, result.stderr
    report = json.loads((out / "export_report.json").read_text())
    levels = [row["level"] for row in report["ladder"]]
    assert levels[:2] == ["f16", "q8_0"] and {"q5_1", "q5_0", "q4_1", "q4_0"} <= set(levels)
    inside = [row for row in report["ladder"] if row["within"]]
    assert all(row["greedy_agreement"] >= 0.9 and abs(row["perplexity_increase"]) <= 0.05 for row in inside)
    best = min(inside, key=lambda row: row["size_bytes"])
    assert report["recommended"] == report["precision"] == best["level"]
    assert (out / "model.gguf").stat().st_size == best["size_bytes"]
    assert {"README.md", "export_report.json", "model.gguf", "config.json", "tokenizer.json"} <= {
        p.name for p in out.iterdir()
    }
    card = (out / "README.md").read_text()
    assert "## Quantization ladder" in card and f"(**{best['level']}**)" in card
    if llama_cpp_missing():
        assert "q4_k_m" not in levels and "pip install llama-cpp-python" in result.stdout + card

    strict = run_cli("export", tiny_run, "--out", tmp_path / "strict", "--format", "gguf", "--ladder",
                     "--max-ppl-increase", "0", "--min-greedy-agreement", "1")  # fmt: skip
    assert strict.exit_code == 1 and "no GGUF level stays within the bar" in strict.stderr
    assert not (tmp_path / "strict").exists()


@pytest.fixture(scope="module")
def onnx_export(tiny_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    pytest.importorskip("onnxruntime")
    out = tmp_path_factory.mktemp("onnx") / "export"
    result = run_cli("export", tiny_run, "--out", out, "--format", "onnx")
    assert result.exit_code == 0, result.stderr
    return out


def test_onnx_runs_in_onnxruntime_with_the_models_logits(tiny_run: Path, onnx_export: Path) -> None:
    import onnxruntime as ort

    out = onnx_export
    model = AutoModelForCausalLM.from_pretrained(tiny_run / "final").eval()
    session = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    ids = torch.randint(0, 300, (3, 21), generator=torch.Generator().manual_seed(1))  # another shape than exported
    mask = torch.ones_like(ids)
    mask[1, 15:] = 0  # a padded row
    logits = session.run(["logits"], {"input_ids": ids.numpy(), "attention_mask": mask.numpy()})[0]
    with torch.no_grad():
        expected = model(input_ids=ids, attention_mask=mask).logits.numpy()
    real = mask.numpy().astype(bool)
    assert np.abs(logits - expected)[real].max() < 1e-4
    assert (out / "README.md").is_file() and (out / "tokenizer.json").is_file()


def test_onnx_int8_is_quantized_and_measured(tiny_run: Path, tmp_path: Path) -> None:
    onnx = pytest.importorskip("onnx")
    out = tmp_path / "int8"
    result = run_cli("export", tiny_run, "--out", out, "--format", "onnx", "--quantize", "int8")
    assert result.exit_code == 0, result.stderr
    ops = {node.op_type for node in onnx.load(str(out / "model.onnx")).graph.node}
    assert "DynamicQuantizeLinear" in ops and ("MatMulInteger" in ops or "DynamicQuantizeMatMul" in ops)
    report = json.loads((out / "export_report.json").read_text())
    assert report["precision"] == "int8" and report["greedy_agreement"] >= 0.9
    assert abs(report["perplexity_increase"]) < 0.05 and report["size_bytes"] == (out / "model.onnx").stat().st_size


def test_broken_parity_fails_and_writes_nothing(tiny_run: Path, tmp_path: Path) -> None:
    out = tmp_path / "strict"
    result = run_cli("export", tiny_run, "--out", out, "--format", "gguf", "--dtype", "q8_0", "--max-logit-diff", "0")
    assert result.exit_code == 1 and "does not behave like the source: max logit difference" in result.stderr
    assert not out.exists() and not list(tmp_path.glob(".strict*"))


def test_model_card_describes_model_data_training_and_evaluation(tiny_run: Path, tmp_path: Path) -> None:
    evaluation = tmp_path / "eval.json"
    assert run_cli("eval", tiny_run, "--tasks", Path(__file__).parent.parent / "recipes/tasks/stories-ppl.yaml",
                   "--report", evaluation).exit_code == 0  # fmt: skip
    out = tmp_path / "hf"
    result = run_cli("export", tiny_run, "--out", out, "--eval-report", evaluation)
    assert result.exit_code == 0, result.stderr
    card = (out / "README.md").read_text()
    dataset = yaml.safe_load((tiny_run / "config.yaml").read_text())["data"]["dataset_dir"]
    assert "Trained from scratch: llama, 2 layers" in card
    assert f"Prepared dataset `{dataset}`" in card and "Training config" in card and "| steps | 30 |" in card
    assert "| stories.perplexity |" in card and "| max abs logit difference | 0 |" in card


def test_export_format_errors(tiny_run: Path, tmp_path: Path) -> None:
    assert_user_error(run_cli("export", tiny_run, "--out", tmp_path / "a", "--format", "tflite"), "--format tflite")
    assert_user_error(run_cli("export", tiny_run, "--out", tmp_path / "b", "--format", "gguf", "--dtype", "q4_k"),
                      "--format gguf takes f32, f16, bf16, q8_0, q5_1")  # fmt: skip
    assert_user_error(
        run_cli("export", tiny_run, "--out", tmp_path / "c", "--format", "gguf", "--quantize", "int8"),
        "applies to --format hf (torchao) and onnx",
    )
    assert_user_error(run_cli("export", tiny_run, "--out", tmp_path / "g", "--quantize", "int3"),
                      "--quantize int3: choose int8 or int4")  # fmt: skip
    tokenizer = AutoTokenizer.from_pretrained(tiny_run / "final")
    shape = {"vocab_size": len(tokenizer), "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
             "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 128, "bos_token_id": 0,
             "eos_token_id": 0, "pad_token_id": 1}  # fmt: skip
    refused = {"writes llama, mistral, qwen2, qwen3, gemma, gpt2 models; this one is 'phi3'": Phi3Config(**shape),
               "attends through a sliding window": MistralConfig(**shape, sliding_window=32)}  # fmt: skip
    for message, config in refused.items():
        source = tmp_path / config.model_type
        AutoModelForCausalLM.from_config(config).save_pretrained(source)
        tokenizer.save_pretrained(source)
        assert_user_error(run_cli("export", source, "--out", tmp_path / "d", "--format", "gguf"), message)
        assert_nothing_written(tmp_path, "d")
    assert_user_error(run_cli("export", tiny_run, "--out", tmp_path / "e", "--format", "gguf", "--ladder", "--dtype",
                              "q8_0"), "--ladder measures every GGUF level")  # fmt: skip
    from llmkit.export.gguf import llama_cpp_missing

    if llama_cpp_missing():
        assert_user_error(run_cli("export", tiny_run, "--out", tmp_path / "f", "--format", "gguf", "--dtype", "q4_k_m"),
                          "--dtype q4_k_m: k-quants", "pip install llama-cpp-python")  # fmt: skip
    text = tmp_path / "notes.txt"
    text.write_text("not a report")
    assert_user_error(run_cli("export", tiny_run, "--out", tmp_path / "h", "--eval-report", text),
                      "notes.txt: not valid JSON")  # fmt: skip
    text.write_text('{"metrics": {"note": "none"}}')
    assert_user_error(run_cli("export", tiny_run, "--out", tmp_path / "i", "--eval-report", text),
                      "not an llmkit eval report")  # fmt: skip
    assert_user_error(run_cli("export", tiny_run, "--out", tmp_path / "j", "--public"), "goes with --push-to-hub")
    assert not any((tmp_path / name).exists() for name in "abcdefghij")


LLAMA_CPP_CHECK = """
import json, sys
import numpy as np
from llama_cpp import Llama
llm = Llama(model_path=sys.argv[1], logits_all=True, verbose=False, n_ctx=64)
ids = json.loads(sys.argv[2])
llm.eval(ids)
print(json.dumps({"logits": np.asarray(llm.scores[: len(ids)]).tolist(),
                  "tokens": llm.tokenize(sys.argv[3].encode(), add_bos=False, special=False)}))
"""


@pytest.mark.parametrize(
    ("arch", "dtype", "max_diff", "agreement"),
    [("llama", "f32", 1e-3, 1.0), ("llama", "bf16", 0.05, 0.9), ("llama", "q8_0", 0.05, 0.9),
     ("llama", "q4_0", 0.05, 0.9), ("llama", "q4_k_m", 0.05, 0.9), ("gpt2", "f32", 1e-3, 1.0),
     ("gpt2", "q5_1", 0.05, 0.9),
     ("mistral", "f32", 1e-3, 1.0), ("qwen2", "f32", 1e-3, 1.0), ("qwen3", "f32", 1e-3, 1.0),
     ("gemma", "f32", 1e-3, 1.0)],
)  # fmt: skip
def test_gguf_runs_in_llama_cpp_with_the_models_logits(
    tiny_run: Path, gpt2_model: Path, tmp_path: Path, arch: str, dtype: str, max_diff: float, agreement: float
) -> None:
    """The real consumer: llama.cpp (through llama-cpp-python) loads the file, tokenizes as the model's tokenizer
    does, and computes the logits of the weights the file holds (read back and dequantized by llmkit: for f32 the
    model's own). llama-cpp-python compiles llama.cpp on install (minutes), so it is not a dev dependency: set
    LLMKIT_LLAMA_CPP_PYTHON to an interpreter that has it, or install it here. The k-quant is made by llama.cpp's
    quantizer, so that export runs in that interpreter (which then needs llmkit too)."""
    import os
    import subprocess
    import sys

    from llmkit.export.gguf import read_gguf

    python = os.environ.get("LLMKIT_LLAMA_CPP_PYTHON") or sys.executable
    probe = subprocess.run([python, "-c", "import llama_cpp, llmkit"], capture_output=True)
    if probe.returncode != 0:
        pytest.skip("llama-cpp-python is not installed (set LLMKIT_LLAMA_CPP_PYTHON)")
    source = tiny_run / "final" if arch == "llama" else gpt2_model
    if arch not in ("llama", "gpt2"):  # a family built from its own config class, with the tiny run's tokenizer
        from tests.test_model_families import tiny_family

        source = tmp_path / arch
        tokenizer = AutoTokenizer.from_pretrained(tiny_run / "final")
        tiny_family(arch, len(tokenizer)).save_pretrained(source)
        tokenizer.save_pretrained(source)
    out = tmp_path / dtype
    export = subprocess.run([python, "-m", "llmkit", "export", str(source), "--out", str(out), "--format", "gguf",
                             "--dtype", dtype], capture_output=True, text=True)  # fmt: skip
    assert export.returncode == 0, export.stderr[-2000:]
    tokenizer = AutoTokenizer.from_pretrained(source)
    text = "Once upon a time, there was a shy cat. It was a soft day."
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    run = subprocess.run([python, "-c", LLAMA_CPP_CHECK, str(out / "model.gguf"), json.dumps(ids), text],
                         capture_output=True, text=True, timeout=120)  # fmt: skip
    assert run.returncode == 0, run.stderr[-2000:]
    result = json.loads(run.stdout)
    assert result["tokens"] == ids
    model = AutoModelForCausalLM.from_pretrained(source).eval()
    state, _ = read_gguf(out / "model.gguf", model)
    model.load_state_dict(state, strict=False)
    model.tie_weights()
    with torch.no_grad():
        expected = model(input_ids=torch.tensor([ids])).logits[0].numpy()
    actual = np.asarray(result["logits"])[:, : expected.shape[1]]
    assert np.abs(actual - expected).max() < max_diff
    assert (actual.argmax(-1) == expected.argmax(-1)).mean() >= agreement


EXPORT_TASKS = """
tasks:
  - name: mc
    kind: multiple_choice
    items:
      - {question: "Once upon a time there was a", choices: ["little girl", "car engine", "dog"], answer: 0}
      - {question: "The cat sat on the", choices: ["mat", "sky", "tree"], answer: 0}
      - {question: "She was very", choices: ["happy", "window", "blue car"], answer: 0}
  - name: gen
    kind: generation
    max_new_tokens: 8
    match: contains
    items:
      - {question: "Once upon a time", answer: "there"}
      - {question: "One day, a little", answer: "girl"}
"""


def _eval_report(command: list[str], model: Path, data: Path, tasks: Path, out: Path, *gates: str) -> dict:
    import subprocess

    run = subprocess.run([*command, "eval", str(model), "--data", str(data), "--tasks", str(tasks), "--report",
                          str(out), *gates], capture_output=True, text=True)  # fmt: skip
    assert run.returncode == 0, run.stderr[-2000:]
    return json.loads(out.read_text())


def test_eval_runs_the_onnx_export_in_onnxruntime_like_the_model(
    tiny_run: Path, tiny_dataset: Path, onnx_export: Path, tmp_path: Path
) -> None:
    """CI gates the artifact that ships: the same data, tasks and gates, the logits from onnxruntime."""
    tasks = tmp_path / "tasks.yaml"
    tasks.write_text(EXPORT_TASKS)
    reports = {}
    for name, model in (("hf", tiny_run), ("onnx", onnx_export)):
        result = run_cli("eval", model, "--data", tiny_dataset, "--tasks", tasks, "--report", tmp_path / f"{name}.json")
        assert result.exit_code == 0, result.stderr
        reports[name] = json.loads((tmp_path / f"{name}.json").read_text())
    hf, onnx = reports["hf"], reports["onnx"]
    assert (hf["runtime"], onnx["runtime"]) == ("transformers", "onnxruntime")
    assert onnx["perplexity"] == pytest.approx(hf["perplexity"], rel=1e-5) and onnx["tokens"] == hf["tokens"]
    assert {k: v for k, v in onnx["metrics"].items() if k.startswith(("mc.", "gen."))} == {
        k: v for k, v in hf["metrics"].items() if k.startswith(("mc.", "gen."))
    }
    assert onnx["tasks"]["gen"]["samples"] == hf["tasks"]["gen"]["samples"]  # greedy answers, token for token
    gate = run_cli("eval", onnx_export, "--data", tiny_dataset, "--gate", f"perplexity<={hf['perplexity'] * 0.9}")
    assert gate.exit_code == 1 and "gate failed: perplexity" in gate.stderr


def test_eval_runs_a_gguf_export_in_llama_cpp(tiny_run: Path, tiny_dataset: Path, tmp_path: Path) -> None:
    """With llama-cpp-python (here or in LLMKIT_LLAMA_CPP_PYTHON, see above): the f32 GGUF scores as the model
    does. Without it, one line says what to install."""
    import importlib.util
    import os
    import subprocess
    import sys

    out = tmp_path / "gguf"
    assert run_cli("export", tiny_run, "--out", out, "--format", "gguf", "--dtype", "f32").exit_code == 0
    if importlib.util.find_spec("llama_cpp") is None:
        assert_user_error(run_cli("eval", out, "--data", tiny_dataset), "evaluated in llama.cpp", "pip install")
    python = os.environ.get("LLMKIT_LLAMA_CPP_PYTHON") or sys.executable
    if subprocess.run([python, "-c", "import llama_cpp, llmkit"], capture_output=True).returncode != 0:
        pytest.skip("llama-cpp-python is not installed (set LLMKIT_LLAMA_CPP_PYTHON)")
    tasks = tmp_path / "tasks.yaml"
    tasks.write_text(EXPORT_TASKS)
    assert (
        run_cli("eval", tiny_run, "--data", tiny_dataset, "--tasks", tasks, "--report", tmp_path / "hf.json").exit_code
        == 0
    )
    hf = json.loads((tmp_path / "hf.json").read_text())
    gguf = _eval_report([python, "-m", "llmkit"], out, tiny_dataset, tasks, tmp_path / "gguf.json")
    assert gguf["runtime"] == "llama.cpp"
    assert gguf["perplexity"] == pytest.approx(hf["perplexity"], rel=1e-3)
    assert gguf["tasks"]["gen"]["samples"] == hf["tasks"]["gen"]["samples"]
    assert gguf["tasks"]["mc"]["acc"] == hf["tasks"]["mc"]["acc"]
