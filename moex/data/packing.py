"""Token blocks: documents -> one token stream -> fixed blocks of `block_size + 1` tokens on disk.

The stream lives in a flat memmap (`uint16` when the vocabulary allows); block i
is tokens [i*(T+1), (i+1)*(T+1)), the tail that fills no block is kept on disk
but never served. Batches are a pure function of the step number (a seeded
permutation per epoch), so resuming needs no data-iterator state.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
import torch

from moex.data.errors import DataError
from moex.data.tokenizers import Tokenizer, token_dtype


def _tmp_name(path: Path) -> Path:
    return path.with_name(f".{path.name}.{os.getpid()}.tmp")


def atomic_write_text(path: Path, text: str) -> None:
    tmp = _tmp_name(path)
    tmp.write_text(text)
    os.replace(tmp, path)


def write_tokens(
    path: str | Path, docs: Iterable[str], tokenizer: Tokenizer, *, batch_docs: int = 512, progress: bool = False
) -> int:
    """Tokenize `docs` in order into one flat token file at `path` (written atomically); return the count."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    dtype = token_dtype(tokenizer.vocab_size)
    docs = list(docs)
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(docs), desc=f"tokenizing {path.stem}", unit="doc", leave=False)
    tmp = _tmp_name(path)
    n_tokens = 0
    try:
        with open(tmp, "wb") as f:
            for start in range(0, len(docs), batch_docs):
                chunk = docs[start : start + batch_docs]
                for ids in tokenizer.encode_batch(chunk):
                    np.asarray(ids, dtype=dtype).tofile(f)
                    n_tokens += len(ids)
                if bar:
                    bar.update(len(chunk))
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
        if bar:
            bar.close()
    return n_tokens


class TokenBlocks:
    """Fixed-length blocks of a token file; `get_batch(step, ...)` is deterministic in `step`."""

    def __init__(self, path: str | Path, block_size: int, dtype: np.dtype | str, *, seed: int = 0, name: str = ""):
        self.path = Path(path)
        self.block_size = block_size
        self.seed = seed
        self.name = name or self.path.stem
        dtype = np.dtype(dtype)
        self.n_tokens = self.path.stat().st_size // dtype.itemsize
        self.n_blocks = self.n_tokens // (block_size + 1)
        if self.n_blocks == 0:
            raise DataError(
                f"{self.name} split has {self.n_tokens} tokens, fewer than one block of block_size+1="
                f"{block_size + 1}; use more data, a larger val_fraction or a smaller block_size"
            )
        self.blocks_NT1 = np.memmap(self.path, dtype=dtype, mode="r", shape=(self.n_blocks, block_size + 1))
        self._perm_epoch = -1
        self._perm_N: np.ndarray | None = None

    def __len__(self) -> int:
        return self.n_blocks

    def _permutation(self, epoch: int) -> np.ndarray:
        if epoch != self._perm_epoch:
            self._perm_N = np.random.default_rng([self.seed, epoch]).permutation(self.n_blocks)
            self._perm_epoch = epoch
        return self._perm_N

    def block_indices(self, step: int, batch_size: int, *, rank: int = 0, world_size: int = 1) -> np.ndarray:
        """Block ids of this rank's slice of global batch `step` (global batch = batch_size*world_size).

        Global position p of the endless stream is block perm_{p // N}[p % N]: every
        block once per epoch, a fresh seeded order each epoch.
        """
        if step < 0 or batch_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"bad batch request: step={step}, batch_size={batch_size}, rank={rank}/{world_size}")
        start = (step * world_size + rank) * batch_size
        pos_B = np.arange(start, start + batch_size)
        out_B = np.empty(batch_size, dtype=np.int64)
        for epoch in np.unique(pos_B // self.n_blocks):
            sel = pos_B // self.n_blocks == epoch
            out_B[sel] = self._permutation(int(epoch))[pos_B[sel] % self.n_blocks]
        return out_B

    def _batch(self, idx_B: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        blocks_BT1 = torch.from_numpy(self.blocks_NT1[idx_B].astype(np.int64))
        return blocks_BT1[:, :-1], blocks_BT1[:, 1:]

    def get_batch(
        self, step: int, batch_size: int, *, rank: int = 0, world_size: int = 1
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(x_BT, y_BT) long tensors for this rank at `step`; y is x shifted left by one token."""
        return self._batch(self.block_indices(step, batch_size, rank=rank, world_size=world_size))

    def iter_eval(
        self, batch_size: int, max_batches: int | None = None, *, rank: int = 0, world_size: int = 1
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Deterministic evaluation batches over blocks in file order (no shuffling).

        With one rank the last batch may be partial; with several, every rank gets
        the same number of full batches so collective ops stay in step.
        """
        global_bs = batch_size * world_size
        n_batches = self.n_blocks // global_bs if world_size > 1 else -(-self.n_blocks // batch_size)
        if n_batches == 0:
            raise DataError(f"{self.name} split has {self.n_blocks} blocks, fewer than one global eval batch {global_bs}")
        if max_batches:
            n_batches = min(n_batches, max_batches)
        for b in range(n_batches):
            start = b * global_bs + rank * batch_size
            yield self._batch(np.arange(start, min(start + batch_size, self.n_blocks)))


def read_meta(path: Path) -> dict | None:
    """The cache's meta.json, or None when the cache is absent or incomplete."""
    try:
        meta = json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None
    for split in ("train", "val"):
        f = path.parent / f"{split}.bin"
        if not f.is_file() or f.stat().st_size != meta[split]["tokens"] * np.dtype(meta["dtype"]).itemsize:
            return None
    return meta
