"""Batches of variable-length examples: packed without cross-contamination, or padded.

Packing places whole examples into rows of at most `max_length` tokens (first-fit decreasing, so rows come
out nearly full), restarts position ids at every example, and gives each row a block-diagonal causal mask,
so no example attends to another: the loss of a packed batch equals the loss of its examples one by one.
With flash-attention-2 the position ids alone mark the boundaries (variable-length kernels), so no mask
is built. Padding (packing off) batches examples as they are, padded to the longest in the batch.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from llmkit.data.templates import Encoded
from llmkit.losses import IGNORE
from llmkit.train.loader import LoaderPosition


def first_fit_decreasing(lengths: np.ndarray, capacity: int) -> list[list[int]]:
    """Group example indices into bins of total length <= capacity, longest first."""
    bins: list[list[int]] = []
    room: list[int] = []
    for index in np.argsort(-lengths, kind="stable"):
        size = int(lengths[index])
        for b, free in enumerate(room):
            if size <= free:
                bins[b].append(int(index))
                room[b] -= size
                break
        else:
            bins.append([int(index)])
            room.append(capacity - size)
    return bins


class TooFewRows(ValueError):
    """The examples (packed or not) make fewer rows than one global micro-batch."""

    def __init__(self, rows: int, needed: int) -> None:
        super().__init__(f"{rows} rows cannot fill one batch of {needed}")
        self.rows = rows


class ExampleLoader:
    """Shuffled micro-batches of examples; position = (epoch, batch index, seed), like BlockLoader.

    Each epoch draws a permutation from (seed, epoch) and packs it into rows (or one example per row); rows of
    similar length are grouped into global micro-batches, whose order is shuffled. Process `rank` takes its
    share of every global micro-batch.
    """

    def __init__(
        self,
        examples: list[Any],
        micro_batch_size: int,
        max_length: int,
        seed: int,
        packing: bool,
        pad_id: int,
        attn_implementation: str,
        rank: int = 0,
        world: int = 1,
        collate: Any = None,
    ) -> None:
        """`collate(rows_of_examples, sample_indices)` builds a batch; the default packs causal-LM rows."""
        self.examples = examples
        self._collate = collate
        self.lengths = np.asarray([len(e) for e in examples])
        self.micro_batch_size, self.max_length = micro_batch_size, max_length
        self.packing, self.pad_id, self.attn_implementation = packing, pad_id, attn_implementation
        self.rank, self.world = rank, world
        self.position = LoaderPosition(seed, batches_per_epoch=0, items_per_batch=micro_batch_size * world)
        self._rows_epoch = -1
        self._rows: list[list[int]] = []
        rows = len(self._epoch_rows(0))
        self.position.batches_per_epoch = rows // (micro_batch_size * world)
        if self.position.batches_per_epoch == 0:
            raise TooFewRows(rows, micro_batch_size * world)

    @property
    def batches_per_epoch(self) -> int:
        return self.position.batches_per_epoch

    def _epoch_rows(self, epoch: int) -> list[list[int]]:
        if self._rows_epoch != epoch:
            rng = np.random.default_rng([self.position.seed, epoch])
            order = rng.permutation(len(self.examples))
            if self.packing:
                bins = first_fit_decreasing(self.lengths[order], self.max_length)
                rows = [[int(order[i]) for i in row] for row in bins]
            else:
                rows = [[int(i)] for i in order]
            # Rows of similar length share a micro-batch (little padding); the groups are shuffled.
            rows.sort(key=lambda row: -int(self.lengths[row].sum()))
            size = self.micro_batch_size * self.world
            groups = [rows[i : i + size] for i in range(0, len(rows), size)]
            self._rows = [row for g in rng.permutation(len(groups)) for row in groups[g]]
            self._rows_epoch = epoch
        return self._rows

    def efficiency(self) -> float:
        """Real tokens / token slots over this epoch's micro-batches (padding counted as waste)."""
        rows = self._epoch_rows(self.position.epoch)
        real = slots = 0
        group = self.micro_batch_size
        for start in range(0, len(rows) - group + 1, group):
            widths = [int(self.lengths[row].sum()) for row in rows[start : start + group]]
            real += sum(widths)
            slots += max(widths) * len(widths)
        return real / slots if slots else 0.0

    def next_batch(self) -> dict[str, torch.Tensor]:
        epoch, index = self.position.advance()
        start = (index * self.world + self.rank) * self.micro_batch_size
        return self.collate(self._epoch_rows(epoch)[start : start + self.micro_batch_size])

    def collate(self, rows: list[list[int]]) -> dict[str, torch.Tensor]:
        examples = [[self.examples[i] for i in row] for row in rows]
        indices = [i for row in rows for i in row]
        if self._collate is not None:
            return dict(self._collate(examples, indices))
        return collate_rows(examples, self.pad_id, self.attn_implementation, indices)


def collate_rows(
    rows: list[list[Encoded]], pad_id: int, attn_implementation: str, sample_indices: list[int] | None = None
) -> dict[str, torch.Tensor]:
    """Tensors for a batch of rows, each row one or more whole examples side by side."""
    width = max(sum(len(e.ids) for e in row) for row in rows)
    ids = np.full((len(rows), width), pad_id, dtype=np.int64)
    labels = np.full((len(rows), width), IGNORE, dtype=np.int64)
    positions = np.zeros((len(rows), width), dtype=np.int64)
    segments = np.full((len(rows), width), -1, dtype=np.int64)  # -1 marks padding
    for r, row in enumerate(rows):
        offset = 0
        for s, example in enumerate(row):
            n = len(example.ids)
            ids[r, offset : offset + n] = example.ids
            labels[r, offset : offset + n] = example.labels
            labels[r, offset] = IGNORE  # nothing predicts an example's first token from the one before
            positions[r, offset : offset + n] = np.arange(n)
            segments[r, offset : offset + n] = s
            offset += n
    batch = {
        "input_ids": torch.from_numpy(ids),
        "labels": torch.from_numpy(labels),
        "position_ids": torch.from_numpy(positions),
        "num_tokens": torch.tensor(int((segments >= 0).sum())),
        "token_mask": torch.from_numpy(segments >= 0),  # real tokens, for a mixture of experts' balancing loss
    }
    if attn_implementation != "flash_attention_2":
        batch["attention_mask"] = block_causal_mask(torch.from_numpy(segments), attn_implementation)
    if sample_indices is not None:
        batch["sample_indices"] = torch.tensor(sample_indices)
    return batch


def block_causal_mask(segments: torch.Tensor, attn_implementation: str) -> torch.Tensor:
    """(B, 1, T, T) mask: a token sees earlier tokens of its own example only; padding sees itself.

    sdpa takes it as booleans; eager needs an additive float mask (0 allowed, most negative blocked).
    """
    same = segments[:, :, None] == segments[:, None, :]
    causal = torch.tril(torch.ones(segments.shape[1], segments.shape[1], dtype=torch.bool))
    padding = segments[:, :, None] < 0
    diagonal = torch.eye(segments.shape[1], dtype=torch.bool)
    allowed = ((same & ~padding) & causal) | (padding & diagonal)
    allowed = allowed[:, None]
    if attn_implementation == "sdpa":
        return allowed
    return torch.zeros(allowed.shape).masked_fill(~allowed, torch.finfo(torch.float32).min)
