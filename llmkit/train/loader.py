"""A resumable loader of packed blocks: its whole position is (epoch, batch index, seed)."""

from __future__ import annotations

import copy
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch

from llmkit.data.store import PackedDataset


@dataclass
class LoaderPosition:
    """Where a loader is: epoch, micro-batch index within it, and the shuffle seed. Resume needs nothing else.

    Saved positions count the items (blocks or rows) consumed in the epoch rather than micro-batches, so a run
    resumes on another number of processes (or micro-batch size) where the same items come next.
    """

    seed: int
    batches_per_epoch: int
    epoch: int = 0
    index: int = 0
    items_per_batch: int = 1  # items in one global micro-batch: micro_batch_size x processes

    def advance(self) -> tuple[int, int]:
        """(epoch, index) of the next global micro-batch, moving past it; a finished epoch rolls over."""
        if self.index >= self.batches_per_epoch:
            self.epoch, self.index = self.epoch + 1, 0
        self.index += 1
        return self.epoch, self.index - 1

    @property
    def epochs_done(self) -> float:
        return self.epoch + self.index / self.batches_per_epoch

    def state_dict(self) -> dict[str, Any]:
        return {
            "epoch": self.epoch,
            "index": self.index,
            "seed": self.seed,
            "consumed": self.index * self.items_per_batch,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a saved position; one saved under another layout continues at the same item when the items
        consumed fill whole micro-batches of this layout (ValueError otherwise)."""
        consumed = int(state.get("consumed", int(state["index"]) * self.items_per_batch))
        if consumed % self.items_per_batch:
            raise ValueError(
                f"{consumed} items were consumed in the epoch, not a whole number of micro-batches of "
                f"{self.items_per_batch}"
            )
        self.epoch, self.index, self.seed = int(state["epoch"]), consumed // self.items_per_batch, int(state["seed"])


class BlockLoader:
    """Shuffled micro-batches of packed blocks, sharded across processes.

    Each epoch is a fresh permutation drawn from (seed, epoch). Global micro-batch `i` of an epoch takes
    permutation[i*B*W : (i+1)*B*W] and process `rank` takes its slice of B, so every block is seen once per
    epoch across all processes, and any position can be restored exactly from three integers. The blocks
    that do not fill a last global micro-batch are skipped for that epoch (they differ every epoch).
    """

    def __init__(self, dataset: PackedDataset, micro_batch_size: int, seed: int, rank: int = 0, world: int = 1):
        self.dataset = dataset
        self.micro_batch_size = micro_batch_size
        self.rank = rank
        self.world = world
        batches_per_epoch = len(dataset) // (micro_batch_size * world)
        if batches_per_epoch == 0:
            raise ValueError(f"{len(dataset)} blocks cannot fill one batch of {micro_batch_size * world}")
        self.position = LoaderPosition(seed, batches_per_epoch, items_per_batch=micro_batch_size * world)
        self._order_epoch = -1
        self._order = np.empty(0, dtype=np.int64)

    @property
    def batches_per_epoch(self) -> int:
        return self.position.batches_per_epoch

    def _permutation(self, epoch: int) -> np.ndarray:
        if self._order_epoch != epoch:
            rng = np.random.default_rng([self.position.seed, epoch])
            self._order, self._order_epoch = rng.permutation(len(self.dataset)), epoch
        return self._order

    def next_indices(self) -> np.ndarray:
        """Block indices of this process's next micro-batch, advancing the position."""
        epoch, index = self.position.advance()
        start = (index * self.world + self.rank) * self.micro_batch_size
        return self._permutation(epoch)[start : start + self.micro_batch_size]

    def next_batch(self) -> dict[str, torch.Tensor]:
        indices = self.next_indices()
        tokens = torch.from_numpy(self.dataset.blocks(indices))
        return {"input_ids": tokens, "labels": tokens, "sample_indices": torch.from_numpy(indices)}


class BatchSource(Protocol):
    """A loader: the next micro-batch, and a position that checkpoints save and resume restores."""

    position: LoaderPosition

    def next_batch(self) -> dict[str, torch.Tensor]: ...


class ReadAhead:
    """A loader that reads the next optimizer step's micro-batches on a background thread while this step computes
    (memory-mapped reads, packing, a teacher cache's rows, and on CUDA the copy into pinned memory), so the device
    never waits for its input. With `background` off (train.read_ahead, off on CPU by default: there the step
    computes on the cores the thread would take) each step is read when it starts, in the same way.

    Its `position` is the wrapped loader's after the last step handed out, not after the step read ahead: a
    checkpoint saves exactly what today's loop consumed, and a resumed run reads the read-ahead step again. The
    loaders draw their order from (seed, epoch) alone, never from a global random state, so reading on another
    thread changes nothing in what is read. The loop takes a step's micro-batches all at once, at its start.
    """

    def __init__(self, source: BatchSource, per_step: int, pin: bool, background: bool) -> None:
        self.source, self.per_step, self.pin = source, per_step, pin
        self.position = copy.copy(source.position)
        self._step: list[dict[str, torch.Tensor]] = []
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="llmkit-read-ahead") if background else None
        self._next: Future[tuple[list[dict[str, torch.Tensor]], LoaderPosition]] | None = None

    def _read(self) -> tuple[list[dict[str, torch.Tensor]], LoaderPosition]:
        batches = [self.source.next_batch() for _ in range(self.per_step)]
        if self.pin:
            batches = [{key: value.pin_memory() for key, value in batch.items()} for batch in batches]
        return batches, copy.copy(self.source.position)

    def next_batch(self) -> dict[str, torch.Tensor]:
        if not self._step:
            self._step, self.position = self._next.result() if self._next is not None else self._read()
            if self._pool is not None:
                self._next = self._pool.submit(self._read)
        return self._step.pop(0)

    def close(self) -> None:
        """Stop reading ahead (a read under way finishes; its step is dropped)."""
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)


def validation_batches(
    dataset: PackedDataset, micro_batch_size: int, max_batches: int | None, rank: int = 0, world: int = 1
) -> list[dict[str, torch.Tensor]]:
    """The same validation micro-batches at every evaluation: the first blocks in order, sharded by rank.

    Every process gets as many batches as the others (`max_batches` rounded up to a multiple of the processes, as far
    as the split allows): a process with none would skip a validation the others run, and under ZeRO-3, whose every
    forward gathers parameters from all processes, the others would wait for it forever.
    """
    count = len(dataset) // micro_batch_size
    if max_batches is not None:
        count = min(count, -(-max_batches // world) * world)
    count -= count % world
    batches = []
    for i in range(rank, count, world):
        tokens = torch.from_numpy(dataset.blocks(np.arange(i * micro_batch_size, (i + 1) * micro_batch_size)))
        batches.append({"input_ids": tokens, "labels": tokens})
    return batches
