"""The anatomy of a training step on the CPU, against a hand-written loop on the same model: aten ops per optimizer
step, the dtype of the output head's and the loss's matmuls, and host reads of device values between log lines.
Instruments wrap the real loop's `_train_step` (nothing is replaced), so a regression shows without a GPU. Also the
seam that keeps GPU-only kernels (Liger) away from everything else in the process."""

from __future__ import annotations

import collections
import traceback
from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.weak import WeakIdKeyDictionary

import llmkit.train.loop as loop
from llmkit.config import load_config
from llmkit.errors import UserError
from llmkit.train.setup import apply_kernels, module_globals_kept
from llmkit.train.strategies import compiles
from tests.conftest import run_cli, tiny_train_args
from tests.gpu_defaults import plain_load


class Ops(TorchDispatchMode):
    """Counts aten ops and records the matmuls (shapes, dtypes)."""

    def __init__(self) -> None:
        super().__init__()
        self.counts: collections.Counter[str] = collections.Counter()
        self.matmuls: list[tuple[list[tuple[int, ...]], list[torch.dtype]]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        self.counts[func.overloadpacket.__name__] += 1
        if func.overloadpacket in (torch.ops.aten.mm, torch.ops.aten.addmm, torch.ops.aten.bmm):
            tensors = [a for a in args if isinstance(a, torch.Tensor)]
            self.matmuls.append(([tuple(t.shape) for t in tensors], [t.dtype for t in tensors]))
        return func(*args, **(kwargs or {}))


class HostReads(TorchDispatchMode):
    """Reads by the host of values computed on the device: anything derived from the model's parameters or the
    optimizer's state, turned into a Python number (item, float, bool, tolist). On a GPU each is a sync."""

    def __init__(self, device_tensors: list[torch.Tensor]) -> None:
        super().__init__()
        self.device = WeakIdKeyDictionary({t: True for t in device_tensors})
        self.reads: list[str] = []

    def read(self, tensor: torch.Tensor) -> None:
        if tensor in self.device:
            self.reads.append("".join(traceback.format_stack(limit=8)[:-2]))

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        out = func(*args, **(kwargs or {}))
        inputs = [a for a in tree_flatten((args, kwargs))[0] if isinstance(a, torch.Tensor)]
        if any(t in self.device for t in inputs):
            if func is torch.ops.aten._local_scalar_dense.default:
                self.reads.append("".join(traceback.format_stack(limit=8)[:-2]))
            for t in tree_flatten(out)[0]:
                if isinstance(t, torch.Tensor):
                    self.device[t] = True
        return out


def watch_steps(monkeypatch: pytest.MonkeyPatch, make_mode, steps: set[int]) -> dict[int, TorchDispatchMode]:
    """Run the real loop with a dispatch mode active from the start of each optimizer step in `steps` (1-based) to
    the start of the next one: the step, its settling, logging, validation and checkpoint."""
    real_step, real_finish = loop._train_step, loop._finish
    modes: dict[int, TorchDispatchMode] = {}
    active: list[TorchDispatchMode] = []

    def close() -> None:
        while active:
            active.pop().__exit__(None, None, None)

    def step(job, run, trace):  # type: ignore[no-untyped-def]
        close()
        if run.step + 1 in steps:
            modes[run.step + 1] = make_mode(job)
            active.append(modes[run.step + 1].__enter__())
        return real_step(job, run, trace)

    def finish(*args, **kwargs):  # type: ignore[no-untyped-def]
        close()
        return real_finish(*args, **kwargs)

    monkeypatch.setattr(loop, "_train_step", step)
    monkeypatch.setattr(loop, "_finish", finish)
    return modes


def hand_written_step_ops(model_dir: Path, micro: int, block: int) -> Ops:
    """The loop a careful user writes: the model's own loss, bf16 autocast, clipping, fused AdamW; one step counted
    after a first one (which creates the optimizer's state)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)
    ids = torch.randint(0, 300, (micro, block))

    def step() -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step()
    with Ops() as ops:
        step()
    return ops


def float32_matmuls(ops: Ops) -> collections.Counter[tuple[tuple[int, ...], ...]]:
    return collections.Counter(tuple(shapes) for shapes, dtypes in ops.matmuls if torch.float32 in dtypes)


def test_a_training_step_is_the_hand_written_loop_plus_little(
    monkeypatch: pytest.MonkeyPatch, tiny_dataset: Path, tmp_path: Path
) -> None:
    """Eager bf16: at most 1.15x the hand-written loop's aten ops per optimizer step; the output head's and the
    loss's matmuls (the vocabulary-wide ones) in bf16, and no matmul in float32 that the loop runs in bf16."""
    modes = watch_steps(monkeypatch, lambda job: Ops(), {7})
    out = tmp_path / "run"
    result = run_cli("pretrain", *tiny_train_args(tiny_dataset, out, steps=8), "--precision", "bf16", "--no-compile")
    assert result.exit_code == 0, result.stderr
    ours = modes[7]
    assert isinstance(ours, Ops)
    reference = hand_written_step_ops(out / "final", micro=8, block=32)
    assert sum(ours.counts.values()) <= 1.15 * sum(reference.counts.values()), (ours.counts, reference.counts)
    vocab = plain_load(out / "final").config.vocab_size
    head = [dtypes for shapes, dtypes in ours.matmuls if any(vocab in shape for shape in shapes)]
    assert len(head) == 3 and all(dtypes == [torch.bfloat16] * 2 for dtypes in head), head  # forward, 2 gradients
    # Float32 only where the loop has it too (some transformers versions take RoPE's angles as a float32 matmul).
    assert float32_matmuls(ours) <= float32_matmuls(reference), (ours.matmuls, reference.matmuls)


def test_a_step_that_logs_nothing_reads_nothing_back_from_the_device(
    monkeypatch: pytest.MonkeyPatch, tiny_dataset: Path, tmp_path: Path
) -> None:
    """Step 7 (no log line, validation or checkpoint) leaves the device running ahead; step 10 (all three) reads
    its numbers once they are needed, which shows the watch sees a read when there is one."""

    def make(job) -> HostReads:  # type: ignore[no-untyped-def]
        state = [t for s in loop._inner(job.optimizer).state.values() for t in s.values() if torch.is_tensor(t)]
        return HostReads([*job.model.parameters(), *state])

    modes = watch_steps(monkeypatch, make, {7, 10})
    real_tolist = torch.Tensor.tolist

    def tolist(self: torch.Tensor):  # type: ignore[no-untyped-def]
        for mode in modes.values():
            mode.read(self)  # type: ignore[attr-defined]
        return real_tolist(self)

    monkeypatch.setattr(torch.Tensor, "tolist", tolist)
    result = run_cli("pretrain", *tiny_train_args(tiny_dataset, tmp_path / "run", steps=12), "--precision", "bf16",
                     "--no-compile")  # fmt: skip
    assert result.exit_code == 0, result.stderr
    assert modes[7].reads == [], "\n".join(modes[7].reads)  # type: ignore[attr-defined]
    assert modes[10].reads  # type: ignore[attr-defined]


def test_compile_is_on_where_a_gpu_user_expects_it_and_refused_where_it_cannot_run(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def cfg(*overrides: str):  # type: ignore[no-untyped-def]
        return load_config("tiny-cpu", list(overrides))

    assert not compiles(cfg())  # auto on a CPU
    assert compiles(cfg("train.compile=true"))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # what `auto` decides on a CUDA machine
    assert compiles(cfg())
    assert not compiles(cfg("distributed.device=cpu"))
    assert not compiles(cfg("distributed.strategy=zero2"))
    assert not compiles(cfg("model.kernels=liger"))  # asked for by name: Liger, not compile
    for refused, fragment in (("distributed.strategy=fsdp", "fsdp"), ("model.kernels=liger", "kernels=liger")):
        with pytest.raises(UserError, match=fragment):
            compiles(cfg("train.compile=true", refused))


def test_gpu_kernels_never_reach_a_model_off_the_gpu_or_a_compiled_one() -> None:
    """The seam before Liger: nothing is applied on a CPU (auto), liger by name refuses there in one line, and a
    compiled run gets none (compile fuses the same layers). What Liger's apply functions rebind in a modeling module
    is put back, so a model built later in the process (an export on the CPU) runs PyTorch's layers."""
    import transformers.models.llama.modeling_llama as modeling

    assert apply_kernels(None, load_config("tiny-cpu", [])) is False
    with pytest.raises(UserError, match="model.kernels=liger: Liger needs a CUDA GPU"):
        apply_kernels(object(), load_config("tiny-cpu", ["model.kernels=liger", "train.compile=false"]))
    assert apply_kernels(None, load_config("tiny-cpu", ["train.compile=true"])) is False
    norm, rope = modeling.LlamaRMSNorm, modeling.apply_rotary_pos_emb
    with module_globals_kept(modeling.__name__):
        modeling.LlamaRMSNorm = object  # what an apply function does
        modeling.apply_rotary_pos_emb = None
        modeling.liger_added = True
    assert modeling.LlamaRMSNorm is norm and modeling.apply_rotary_pos_emb is rope
    assert not hasattr(modeling, "liger_added")
