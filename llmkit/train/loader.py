"""A resumable loader of packed blocks: its whole position is (epoch, batch index, seed)."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from llmkit.data.store import PackedDataset


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
        self.seed = seed
        self.rank = rank
        self.world = world
        self.batches_per_epoch = len(dataset) // (micro_batch_size * world)
        if self.batches_per_epoch == 0:
            raise ValueError(f"{len(dataset)} blocks cannot fill one batch of {micro_batch_size * world}")
        self.epoch = 0
        self.index = 0
        self._order_epoch = -1
        self._order = np.empty(0, dtype=np.int64)

    def _permutation(self) -> np.ndarray:
        if self._order_epoch != self.epoch:
            self._order = np.random.default_rng([self.seed, self.epoch]).permutation(len(self.dataset))
            self._order_epoch = self.epoch
        return self._order

    def next_indices(self) -> np.ndarray:
        """Block indices of this process's next micro-batch, advancing the position."""
        if self.index >= self.batches_per_epoch:
            self.epoch += 1
            self.index = 0
        global_size = self.micro_batch_size * self.world
        start = self.index * global_size + self.rank * self.micro_batch_size
        indices = self._permutation()[start : start + self.micro_batch_size]
        self.index += 1
        return indices

    def next_batch(self) -> dict[str, torch.Tensor]:
        indices = self.next_indices()
        tokens = torch.from_numpy(self.dataset.blocks(indices))
        return {"input_ids": tokens, "labels": tokens, "sample_indices": torch.from_numpy(indices)}

    @property
    def epochs_done(self) -> float:
        return self.epoch + self.index / self.batches_per_epoch

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "index": self.index, "seed": self.seed}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.epoch, self.index, self.seed = int(state["epoch"]), int(state["index"]), int(state["seed"])


def validation_batches(
    dataset: PackedDataset, micro_batch_size: int, max_batches: int | None, rank: int = 0, world: int = 1
) -> list[dict[str, torch.Tensor]]:
    """The same validation micro-batches at every evaluation: the first blocks in order, sharded by rank."""
    count = len(dataset) // micro_batch_size
    if max_batches is not None:
        count = min(count, max_batches)
    batches = []
    for i in range(rank, count, world):
        tokens = torch.from_numpy(dataset.blocks(np.arange(i * micro_batch_size, (i + 1) * micro_batch_size)))
        batches.append({"input_ids": tokens, "labels": tokens})
    return batches
