"""The on-disk dataset store: packed token blocks in flat binary shards, described by manifest.json.

Layout of a prepared dataset directory::

    manifest.json          sources, settings, tokenizer hash, counts, fingerprint
    tokenizer/             the tokenizer, loadable with AutoTokenizer.from_pretrained
    train/shard-00000.bin  uint16 or uint32 tokens, shape (blocks, block_size), C order
    val/shard-00000.bin

Shards are memory-mapped when read, so a dataset larger than RAM trains without loading it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from llmkit.errors import UserError

MANIFEST = "manifest.json"
FORMAT_VERSION = 1
SPLITS = ("train", "val")


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 2**16 else np.dtype(np.uint32)


class ShardWriter:
    """Packs a stream of token arrays into fixed-length blocks and appends them to shard files.

    Only whole blocks are written; the tokens left over at the end (fewer than one block) are the
    remainder, reported in the manifest and dropped.
    """

    def __init__(self, directory: Path, block_size: int, dtype: np.dtype, blocks_per_shard: int) -> None:
        self.directory = directory
        self.block_size = block_size
        self.dtype = dtype
        self.blocks_per_shard = blocks_per_shard
        self.pending = np.empty(0, dtype=dtype)
        self.shards: list[dict[str, Any]] = []
        self.tokens = 0
        directory.mkdir(parents=True, exist_ok=True)

    def add(self, tokens: np.ndarray) -> None:
        self.tokens += len(tokens)
        stream = np.concatenate([self.pending, tokens.astype(self.dtype, copy=False)])
        whole = len(stream) // self.block_size * self.block_size
        self.pending = stream[whole:]
        blocks = stream[:whole].reshape(-1, self.block_size)
        while len(blocks):
            if not self.shards or self.shards[-1]["blocks"] >= self.blocks_per_shard:
                self.shards.append({"file": f"{self.directory.name}/shard-{len(self.shards):05d}.bin", "blocks": 0})
            shard = self.shards[-1]
            room = self.blocks_per_shard - shard["blocks"]
            chunk, blocks = blocks[:room], blocks[room:]
            with (self.directory.parent / shard["file"]).open("ab") as handle:
                handle.write(np.ascontiguousarray(chunk).tobytes())
            shard["blocks"] += len(chunk)

    @property
    def blocks(self) -> int:
        return sum(shard["blocks"] for shard in self.shards)

    @property
    def remainder(self) -> int:
        return len(self.pending)


class PackedDataset:
    """Read-only view of one split: `len()` blocks, each `block_size` token ids."""

    def __init__(self, root: Path, split: str, manifest: dict[str, Any]) -> None:
        info = manifest["splits"][split]
        self.block_size = int(manifest["block_size"])
        dtype = np.dtype(manifest["dtype"])
        self.shards = [
            np.memmap(root / shard["file"], dtype=dtype, mode="r", shape=(shard["blocks"], self.block_size))
            for shard in info["shards"]
            if shard["blocks"]
        ]
        self.offsets = np.cumsum([0] + [len(shard) for shard in self.shards])

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def blocks(self, indices: np.ndarray | list[int]) -> np.ndarray:
        """Gather blocks by global index into an int64 array of shape (len(indices), block_size)."""
        out = np.empty((len(indices), self.block_size), dtype=np.int64)
        for row, index in enumerate(indices):
            shard = int(np.searchsorted(self.offsets, index, side="right")) - 1
            out[row] = self.shards[shard][index - self.offsets[shard]]
        return out


@dataclass(frozen=True)
class PreparedDataset:
    root: Path
    manifest: dict[str, Any]

    @property
    def tokenizer_dir(self) -> Path:
        return self.root / "tokenizer"

    def split(self, name: str) -> PackedDataset:
        return PackedDataset(self.root, name, self.manifest)


def open_dataset(path: str | Path) -> PreparedDataset:
    """Open a prepared dataset directory, with a clear error when it is not one."""
    root = Path(path)
    manifest_path = root / MANIFEST
    if not root.exists():
        raise UserError(f"{root}: dataset directory not found; create it with `llmkit data-prep`")
    if not manifest_path.is_file():
        raise UserError(f"{root}: not a prepared dataset (no {MANIFEST}); create it with `llmkit data-prep`")
    manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    if manifest.get("format_version") != FORMAT_VERSION:
        raise UserError(f"{manifest_path}: dataset format {manifest.get('format_version')} is not supported")
    return PreparedDataset(root, manifest)
