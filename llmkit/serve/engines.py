"""What turns token ids into new tokens for `llmkit serve`: transformers' continuous batching, or llama.cpp for GGUF.

llmkit writes no scheduler. An HF model (a run, a checkpoint, a LoRA run merged in memory, an export) is served by
transformers' continuous-batching manager: requests join and leave the running batch at every step over a paged
KV cache. A GGUF export is served by llama.cpp (llama-cpp-python), one request at a time. vLLM, for GPU nodes and
tensor parallelism, is started as its own server (`vllm_command`).

Every engine streams cumulative token lists to an asyncio queue and can cancel a request.
"""

from __future__ import annotations

import asyncio
import importlib.util
import math
import shutil
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from llmkit.errors import UserError
from llmkit.export.formats import export_format

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

# On CPU, transformers sizes the paged KV cache from the machine's whole memory, which makes each step slow;
# llmkit gives it what the running batch can use: every request at its longest, in pages of this many tokens.
PAGE_TOKENS = 64


@dataclass(frozen=True)
class Request:
    """One generation: prompt ids and how to sample (temperature 0 is greedy)."""

    ids: list[int]
    max_new_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    ignore_eos: bool = False


@dataclass
class Update:
    """Every token generated so far for a request; `done` on the last update, `error` if the engine failed it."""

    tokens: list[int]
    done: bool
    error: str | None = None


class TransformersEngine:
    """transformers' ContinuousBatchingManager over one model; sampling parameters per request.

    One manager samples for every request: a greedy request keeps only its most likely token (top-k 1), so the
    draw is the argmax exactly, and a greedy answer equals `llmkit generate --temperature 0`.
    """

    name = "transformers"

    def __init__(self, model: Any, stop_ids: list[int], pad_id: int | None, max_batch: int, context: int) -> None:
        from transformers import GenerationConfig
        from transformers.generation.configuration_utils import ContinuousBatchingConfig

        self.vocab = int(model.config.get_text_config().vocab_size)
        # Values other than 1.0 make transformers build the per-request temperature / top-k / top-p processors.
        generation = GenerationConfig(
            do_sample=True, temperature=0.7, top_k=self.vocab, top_p=0.95, eos_token_id=stop_ids, pad_token_id=pad_id
        )
        sizing: dict[str, Any] = {}
        if model.device.type == "cpu":
            pages = max_batch * math.ceil(max(context, PAGE_TOKENS) / PAGE_TOKENS) + 1
            sizing = {"page_size": PAGE_TOKENS, "num_blocks": pages, "max_batch_tokens": max(2048, context)}
        batching = ContinuousBatchingConfig(max_requests_per_batch=max_batch, per_request_processors=True, **sizing)
        self.start = lambda: model.init_continuous_batching(
            generation_config=generation, continuous_batching_config=batching
        )
        self.manager = self.start()
        self.manager.start()
        self.stop_ids = stop_ids
        self.restarts = 0

    def alive(self) -> bool:
        """Whether the generation thread runs, starting a new one first if it died (transformers ends it on an
        error it cannot pin on one request, failing the requests it held): one failure never stops the service."""
        if self.manager.is_running():
            return True
        try:
            self.manager = self.start()
            self.manager.start()
        except Exception:  # noqa: BLE001 - a manager that cannot start again: /health says so
            return False
        self.restarts += 1
        return self.manager.is_running()

    def submit(self, request_id: str, request: Request, queue: asyncio.Queue[Update]) -> None:
        """Start generating; every new token lands in `queue` (call from the event loop)."""

        def deliver(output: Any) -> None:
            error = str(output.error) if getattr(output, "error", None) else None
            queue.put_nowait(Update(list(output.generated_tokens), output.is_finished(), error))

        if not self.alive():
            queue.put_nowait(Update([], True, "the generation engine stopped and could not start again"))
            return
        self.manager.register_result_handler(request_id, deliver)
        greedy = request.temperature == 0
        self.manager.add_request(
            request.ids,
            request_id=request_id,
            max_new_tokens=request.max_new_tokens,
            streaming=True,
            eos_token_id=-1 if request.ignore_eos else self.stop_ids,
            temperature=1.0 if greedy else float(request.temperature),
            top_k=1 if greedy else min(request.top_k or self.vocab, self.vocab),  # beyond the vocabulary: all
            top_p=1.0 if greedy else float(request.top_p),
        )

    def cancel(self, request_id: str) -> None:
        self.manager.cancel_request(request_id)
        with self.manager.output_router._lock:  # no further deliveries to a request nobody reads
            self.manager.output_router.result_handlers.pop(request_id, None)

    def close(self) -> None:
        self.manager.stop(block=True, timeout=30)


class LlamaCppEngine:
    """A GGUF export in llama.cpp: one request at a time (llama.cpp's own context), streamed token by token."""

    name = "llama.cpp"
    restarts = 0

    def __init__(self, gguf: Path, stop_ids: list[int], context: int) -> None:
        import llama_cpp

        from llmkit.export.gguf import quiet_native_stderr

        with quiet_native_stderr():
            self.llama = llama_cpp.Llama(str(gguf), n_ctx=context, logits_all=False, verbose=False)
        self.stop_ids = set(stop_ids)
        self.lock = threading.Lock()
        self.cancelled: set[str] = set()

    def submit(self, request_id: str, request: Request, queue: asyncio.Queue[Update]) -> None:
        loop = asyncio.get_running_loop()

        def run() -> None:
            tokens: list[int] = []
            error = None
            try:
                with self.lock:
                    self.llama.reset()
                    greedy = request.temperature == 0
                    top_k = 1 if greedy else min(request.top_k, self.llama.n_vocab())
                    sampling = {
                        "top_k": top_k,
                        "top_p": request.top_p,
                        "min_p": 0.0,
                        "temp": 0.0 if greedy else request.temperature,
                        "repeat_penalty": 1.0,
                    }
                    for token in self.llama.generate(request.ids, reset=True, **sampling):
                        if request_id in self.cancelled or len(tokens) >= request.max_new_tokens:
                            break
                        tokens.append(int(token))
                        if token in self.stop_ids and not request.ignore_eos:
                            break
                        loop.call_soon_threadsafe(queue.put_nowait, Update(list(tokens), False))
            except Exception as exc:  # a failed generation fails this request, not the server
                error = str(exc) or type(exc).__name__
            self.cancelled.discard(request_id)
            loop.call_soon_threadsafe(queue.put_nowait, Update(tokens, True, error))

        threading.Thread(target=run, daemon=True).start()

    def alive(self) -> bool:
        return True  # each request runs on a thread of its own; a failure fails that request alone

    def cancel(self, request_id: str) -> None:
        self.cancelled.add(request_id)

    def close(self) -> None:
        with self.lock:  # after the one generating now, if any
            self.llama.close()


@dataclass
class Served:
    """A loaded model, ready to serve: the engine, the tokenizer, and what the API needs to know about it."""

    engine: Any
    tokenizer: PreTrainedTokenizerBase
    context: int
    generator: Any  # llmkit.generate.Generator: the chat template and prompt handling `llmkit generate` uses
    token_chars: int = 64  # the most characters one token stands for: a longer text needs more tokens than chars/this


def servable_dir(model_path: str | Path) -> Path:
    """The model directory to serve, checked before anything listens: a wrong path or a format that cannot be
    served here is one line."""
    from llmkit.export.gguf import llama_cpp_missing
    from llmkit.runs import refuse_scoring_model, resolve_model_dir

    model_dir = resolve_model_dir(model_path)
    refuse_scoring_model(model_dir, "served")
    fmt = export_format(model_dir)
    if fmt is not None and fmt.serves is not None:
        raise UserError(f"{model_path}: {fmt.serves}")
    if fmt is not None and fmt.name == "gguf" and llama_cpp_missing():
        raise UserError(f"{model_path}: a GGUF export is served by llama.cpp: pip install llama-cpp-python")
    return model_dir


def load_served(model_path: str | Path, max_batch: int) -> Served:
    """Load a run, checkpoint, HF or GGUF export directory for serving (LoRA adapters merged in memory)."""
    from llmkit.data.tokenizer import load_tokenizer
    from llmkit.generate import END_OF_TURN, Generator
    from llmkit.models import load_trained_model, model_context
    from llmkit.runs import find_tokenizer_dir

    model_dir = servable_dir(model_path)
    tokenizer = load_tokenizer(find_tokenizer_dir(model_dir))
    vocab = tokenizer.get_vocab()
    stops = sorted({int(tokenizer.eos_token_id)} | {vocab[token] for token in END_OF_TURN if token in vocab})
    token_chars = max(len(token) for token in vocab)
    exported = export_format(model_dir)
    if exported is not None and exported.name == "gguf":
        from transformers import AutoConfig

        context = model_context(AutoConfig.from_pretrained(model_dir))
        engine: Any = LlamaCppEngine(model_dir / "model.gguf", stops, context)
        return Served(engine, tokenizer, context, Generator(None, tokenizer, stops), token_chars)
    model = load_trained_model(model_dir, merge=True).eval()
    if torch.cuda.is_available():
        model = model.to("cuda")
    context = model_context(model) or 4096
    engine = TransformersEngine(model, stops, tokenizer.pad_token_id, max_batch, context)
    return Served(engine, tokenizer, context, Generator(model, tokenizer, stops), token_chars)


def vllm_command(
    model_path: str | Path, name: str, host: str, port: int, tensor_parallel: int, max_batch: int
) -> list[str]:
    """The `vllm serve` command line for a run or model directory (vLLM serves it with its own API and metrics;
    the API key goes to it in VLLM_API_KEY, never on a command line other users can read)."""
    from llmkit.runs import resolve_model_dir

    if importlib.util.find_spec("vllm") is None or shutil.which("vllm") is None:
        raise UserError("--engine vllm: vLLM is not installed here: pip install vllm (on a CUDA machine)")
    model_dir = resolve_model_dir(model_path)
    if (model_dir / "adapter_config.json").is_file():
        raise UserError(f"{model_path}: a LoRA run; export it merged first (`llmkit export`), then serve the export")
    exported = export_format(model_dir)
    if exported is not None:
        raise UserError(f"{model_path}: a {exported.name} export; vLLM serves the HF model directory")
    return [
        "vllm",
        "serve",
        str(model_dir),
        "--served-model-name",
        name,
        "--host",
        host,
        "--port",
        str(port),
        "--tensor-parallel-size",
        str(tensor_parallel),
        "--max-num-seqs",
        str(max_batch),
    ]
