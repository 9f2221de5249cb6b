"""Token blocks: one token stream on disk -> fixed blocks of `block_size + 1` tokens.

The stream is a token file or consecutive shard files (`uint16` when the
vocabulary allows), each read through its own memmap; block i is tokens
[i*(T+1), (i+1)*(T+1)) of the whole stream (it may span two shards), the tail
that fills no block is kept on disk but never served. Batches are a pure
function of the step number (a seeded permutation per epoch), so resuming
needs no data-iterator state.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Iterator, Sequence

import numpy as np

from moex.data.errors import DataError

if TYPE_CHECKING:
    import torch


class ShardedTokens:
    """A token stream stored as consecutive shard files, read lazily (one memmap per shard, opened
    on first use); `read(start, n)` gives tokens [start, start + n) of the concatenation."""

    def __init__(self, paths: Sequence[str | Path], dtype: np.dtype | str):
        self.dtype = np.dtype(dtype)
        sizes = [Path(p).stat().st_size // self.dtype.itemsize for p in paths]
        keep = [i for i, n in enumerate(sizes) if n]  # an empty file cannot be mapped and holds nothing
        self.paths = [Path(paths[i]) for i in keep]
        self.starts_S1 = np.concatenate([[0], np.cumsum([sizes[i] for i in keep])]).astype(np.int64)
        self._maps: dict[int, np.memmap] = {}

    def __len__(self) -> int:
        return int(self.starts_S1[-1])

    def _shard(self, s: int) -> np.memmap:
        if s not in self._maps:
            self._maps[s] = np.memmap(self.paths[s], dtype=self.dtype, mode="r")
        return self._maps[s]

    def read(self, start: int, n: int) -> np.ndarray:
        if start < 0 or n < 0 or start + n > len(self):
            raise IndexError(f"tokens [{start}, {start + n}) outside a stream of {len(self)}")
        out = np.empty(n, dtype=self.dtype)
        s = int(np.searchsorted(self.starts_S1, start, side="right")) - 1
        done = 0
        while done < n:
            lo = start + done - int(self.starts_S1[s])
            take = min(n - done, int(self.starts_S1[s + 1]) - (start + done))
            out[done : done + take] = self._shard(s)[lo : lo + take]
            done += take
            s += 1
        return out


class TokenBlocks:
    """Fixed-length blocks of a token file or of consecutive shard files (one stream);
    `get_batch(step, ...)` is deterministic in `step`."""

    def __init__(self, paths: str | Path | Sequence[str | Path], block_size: int, dtype: np.dtype | str, *,
                 seed: int = 0, name: str = ""):
        paths = [paths] if isinstance(paths, (str, Path)) else list(paths)
        self.tokens = ShardedTokens(paths, dtype)
        self.block_size = block_size
        self.seed = seed
        self.name = name or (Path(paths[0]).stem if paths else "data")
        self.n_tokens = len(self.tokens)
        self.n_blocks = self.n_tokens // (block_size + 1)
        if self.n_blocks == 0:
            raise DataError(
                f"{self.name} split has {self.n_tokens} tokens, fewer than one block of block_size+1="
                f"{block_size + 1}; use more data, a larger val_fraction or a smaller block_size"
            )
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
        import torch  # here, so that `moex prepare` and its tokenizing workers never load torch

        W = self.block_size + 1
        blocks_BT1 = torch.from_numpy(np.stack([self.tokens.read(int(i) * W, W) for i in idx_B]).astype(np.int64))
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
