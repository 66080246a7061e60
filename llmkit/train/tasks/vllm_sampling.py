"""GRPO's answers sampled by vLLM in the training process (`finetune.grpo.engine: vllm`), the weights synced from
the model being trained before every step that samples.

vLLM runs colocated: its engine in this process (VLLM_ENABLE_V1_MULTIPROCESSING=0), built from the policy's config
with dummy weights, then handed the policy's weights by reference (its `reload_weights`, plain transformers names; LoRA
and trainable token rows folded in out of place, so the trained model is left as it was to the bit). It never reads
a tokenizer or a file of weights: prompts go in as token ids and answers come back as token ids. On several
processes each keeps an engine of its own over the launcher's process group (vLLM's external launcher).

Each prompt's answers are drawn from a seed tied to the step, the micro-batch, the process and the prompt's place,
so a resumed run samples the same answers as the uninterrupted one. The loss's log-probs are the policy's own
(recomputed by the training forward), as with `generate`. vLLM's kernels make its sampling distribution differ from
the policy's by rounding (more so in bf16), so it also returns the log-prob of each token it drew (after temperature:
vLLM's processed log-probs), and the loss weighs each answer by how much likelier it is under the policy
(`finetune.grpo.vllm_correction`, llmkit.train.tasks.grpo.sampling_weights).
"""

from __future__ import annotations

import os
import random
import tempfile
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

from llmkit.errors import UserError, shorten


def merged_weights(policy: Any) -> Iterator[tuple[str, torch.Tensor]]:
    """The policy's weights under plain transformers names: a PEFT model's LoRA deltas and trainable token rows
    folded into the base weights out of place, its own adapter weights left out."""
    from peft import PeftModel

    if not isinstance(policy, PeftModel):
        yield from ((name, p.detach()) for name, p in policy.named_parameters(remove_duplicate=False))
        return
    from peft.tuners.lora import LoraLayer
    from peft.tuners.trainable_tokens.layer import TrainableTokensLayer

    base = policy.get_base_model()
    folded: set[str] = set()
    for name, module in base.named_modules():
        layer: Any = module  # (peft's layers are typed loosely)
        if isinstance(module, LoraLayer):
            weight = layer.get_base_layer().weight.detach()
            for adapter in layer.active_adapters:
                if adapter in layer.lora_A:
                    weight = weight + layer.get_delta_weight(adapter).to(weight.dtype)
        elif isinstance(module, TrainableTokensLayer):
            weight = layer.get_merged_weights(layer.active_adapters).detach()
        else:
            continue
        folded.add(f"{name}.")
        yield f"{_plain(name)}.weight", weight
        if getattr(layer.get_base_layer(), "bias", None) is not None:
            yield f"{_plain(name)}.bias", layer.get_base_layer().bias.detach()
    for name, parameter in base.named_parameters(remove_duplicate=False):
        if any(name.startswith(prefix) for prefix in folded) or ".original_module." in name:
            continue
        yield _plain(name), parameter.detach()


def _plain(name: str) -> str:
    """A name inside peft's wrappers as plain transformers spells it."""
    for wrapper in (".token_adapter", ".base_layer", ".modules_to_save.default"):
        name = name.replace(wrapper, "")
    return name


class VllmSampler:
    """A colocated vLLM engine over the policy's shapes; `sync` hands it the policy's weights, `sample` draws."""

    def __init__(
        self, policy: Any, max_length: int, dtype: torch.dtype, memory: float, seed: int, processes: int = 1
    ) -> None:
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # the engine in this process: weights pass by reference
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB, on CPU (vLLM's default is a share of memory)
        os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")  # on CPU, training shares the cores
        os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")  # (its start-up notes would bury the run's progress)
        from peft import PeftModel
        from vllm import LLM

        base: Any = policy.get_base_model() if isinstance(policy, PeftModel) else policy
        config = base.config.__class__.from_dict(base.config.to_dict())
        config.architectures = [type(base).__name__]
        # vLLM seeds the process's random generators and, on CPU, takes torch's threads down to one and replaces
        # torch.set_num_threads: what the training run had is given back, so sampling by vLLM leaves it unchanged
        states, threads, set_threads = (
            (random.getstate(), np.random.get_state()),
            torch.get_num_threads(),
            torch.set_num_threads,
        )
        cuda = list(range(torch.cuda.device_count())) if torch.cuda.is_initialized() else []
        # the config's folder is read while the engine is built, and removed then (a training command ends with
        # os._exit, which runs no finalizer)
        with tempfile.TemporaryDirectory(prefix="llmkit-vllm-") as folder:
            config.save_pretrained(folder)
            try:
                with torch.random.fork_rng(devices=cuda):
                    self.llm = LLM(
                        model=folder,
                        skip_tokenizer_init=True,
                        load_format="dummy",
                        dtype=str(dtype).removeprefix("torch."),
                        max_model_len=max_length,
                        gpu_memory_utilization=memory,
                        enable_prefix_caching=False,  # a cache would outlive the weights it was computed with
                        # whole prefills only: a chunked one discards a draw, which a seeded CPU generator cannot undo
                        enable_chunked_prefill=False,
                        seed=seed,
                        # the drawn tokens' log-probs after temperature, as the loss's
                        logprobs_mode="processed_logprobs",
                        # on several processes each keeps an engine of its own over the launcher's process group
                        **({"distributed_executor_backend": "external_launcher"} if processes > 1 else {}),
                    )
            except Exception as error:  # noqa: BLE001 (vLLM's refusals come as any exception)
                raise UserError(f"finetune.grpo.engine=vllm: vLLM cannot run this model: {_gist(error)}") from None
            finally:
                random.setstate(states[0])
                np.random.set_state(states[1])
                torch.set_num_threads = set_threads
                torch.set_num_threads(threads)

    def sync(self, policy: Any) -> None:
        # (vLLM's reload restores its loaders on weights it has repacked for its kernels, then repacks again)
        with torch.no_grad():  # LoRA's deltas are computed as the weights are read, outside autograd
            self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": merged_weights(policy)})

    def sample(
        self, prompts: list[np.ndarray], copies: int, seed: int, settings: Any, stop_ids: set[int]
    ) -> list[tuple[np.ndarray, np.ndarray]]:
        """`copies` answers to each prompt, prompt by prompt: each answer's token ids through the first stop token,
        and the log-prob vLLM drew each with."""
        from vllm import SamplingParams

        requests = [{"prompt_token_ids": [int(t) for t in ids]} for ids in prompts]
        params = [
            SamplingParams(
                n=copies,
                temperature=settings.temperature,
                top_p=settings.top_p,
                top_k=settings.top_k,
                max_tokens=settings.max_new_tokens,
                stop_token_ids=sorted(stop_ids),
                seed=(seed * 1_000_003 + i) % 2**63,
                detokenize=False,
                logprobs=0,  # the drawn token's only
            )
            for i in range(len(prompts))
        ]
        try:
            outputs = self.llm.generate(requests, params, use_tqdm=False)
        except Exception as error:  # noqa: BLE001
            raise UserError(f"finetune.grpo.engine=vllm: vLLM failed to sample: {_gist(error)}") from None
        return [_drawn(o) for out in outputs for o in sorted(out.outputs, key=_index)]


def _index(output: Any) -> int:
    return int(output.index)


def _drawn(output: Any) -> tuple[np.ndarray, np.ndarray]:
    ids = [int(t) for t in output.token_ids]
    logps = [float(step[token].logprob) for step, token in zip(output.logprobs, ids, strict=True)]
    return np.asarray(ids, dtype=np.int64), np.asarray(logps, dtype=np.float32)


def _gist(error: BaseException) -> str:
    """The last line of an error's message: vLLM's most specific."""
    return shorten((str(error).strip() or type(error).__name__).splitlines()[-1], 200)
