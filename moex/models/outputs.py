"""The value every FFN layer (dense or sparse) returns.

Aux losses and routing statistics travel as return values so nothing about a
forward pass hides in module state. Called with ``features=True``, a layer also
returns the activations it computed (its interpretability feature sources), so
no one has to re-derive them by re-running its router or experts.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor


@dataclass
class SparseCode:
    """A (T, F) activation matrix kept as its non-zero blocks of B consecutive columns.

    Entry n puts ``values_NB[n]`` at row ``row_N[n]``, columns ``block_N[n]*B … block_N[n]*B + B-1``;
    entries at the same place add up. B = 1 is plain coordinate format. Every other
    column of a row is exactly zero.
    """

    row_N: Tensor  # int64
    block_N: Tensor  # int64
    values_NB: Tensor
    num_features: int

    def to_dense(self, num_rows: int) -> Tensor:
        """The (num_rows, F) matrix."""
        B = self.values_NB.shape[1]
        out = self.values_NB.new_zeros(num_rows, self.num_features // B, B)
        out.index_put_((self.row_N, self.block_N), self.values_NB, accumulate=True)
        return out.view(num_rows, self.num_features)

    def select_rows(self, rows_P: Tensor, num_rows: int) -> "SparseCode":
        """The rows ``rows_P`` (distinct, in that order) of a num_rows-row matrix, as a P-row SparseCode."""
        new_of_old = torch.full((num_rows,), -1, dtype=torch.long, device=self.row_N.device)
        new_of_old[rows_P] = torch.arange(rows_P.numel(), device=self.row_N.device)
        new_N = new_of_old[self.row_N]
        keep = new_N >= 0
        return SparseCode(new_N[keep], self.block_N[keep], self.values_NB[keep], self.num_features)

    def coo(self) -> tuple[Tensor, Tensor, Tensor]:
        """(row, column, value) of every stored scalar (duplicates not summed)."""
        N, B = self.values_NB.shape
        cols_NB = self.block_N[:, None] * B + torch.arange(B, device=self.block_N.device)
        return self.row_N[:, None].expand(N, B).reshape(-1), cols_NB.reshape(-1), self.values_NB.reshape(-1)


Features = dict[str, "Tensor | SparseCode"]  # source name -> (T, F) dense matrix or SparseCode


@dataclass
class FFNOutput:
    y: Tensor  # same shape as the input
    aux_losses: dict[str, Tensor] = field(default_factory=dict)  # scaled, summed into the loss
    # Detached statistics. Sparse layers fill: tokens_per_expert (E,), router_entropy,
    # dropped_frac, active_frac (active hidden units per token / all hidden units).
    stats: dict[str, Tensor] = field(default_factory=dict)
    # Only when the layer is called with features=True: its feature sources, detached,
    # rows = the input's leading dims flattened (see moex.interp.features for the names).
    features: Features = field(default_factory=dict)


def router_entropy(p: Tensor) -> Tensor:
    """Mean over leading dims of the entropy -sum p log p of distributions along the last dim
    (the ``router_entropy`` statistic of every sparse layer; 0 log 0 = 0)."""
    return -(p * p.clamp_min(1e-12).log()).sum(-1).mean()
