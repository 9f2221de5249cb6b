"""Token permutation for MoE dispatch and combine.

Shape key: T tokens, D model dim, A assignments ((token, expert) pairs, e.g. T*k),
E experts.

`permute` sorts assignments by expert (stably, so within an expert the original
assignment order is kept) and gathers the token rows; `unpermute` weights each
expert output row by its gate and scatter-adds it back onto its token. Both are
differentiable (gather <-> index_add are each other's backward). Plain Python
loop references sit next to them for tests.
"""

from __future__ import annotations

import torch
from torch import Tensor

from moex.ops.fused import gated_scatter_add, sort_by_expert

__all__ = ["permute", "unpermute", "permute_reference", "unpermute_reference"]


def permute(x_TD: Tensor, token_A: Tensor, expert_A: Tensor, num_experts: int) -> tuple[Tensor, Tensor, Tensor]:
    """Group assignment rows by expert.

    Args:
        x_TD: token activations.
        token_A: int64 token index of every assignment (any order).
        expert_A: int64 expert index of every assignment, in [0, num_experts).
        num_experts: E.

    Returns:
        x_AD: ``x_TD[token_A[order_A]]`` (rows grouped by expert, ascending).
        order_A: the stable permutation that sorts ``expert_A``; sorted position i
            holds original assignment ``order_A[i]``.
        counts_E: int64 number of assignments per expert (sums to A).

    Gradients flow to ``x_TD`` (the backward of the gather is a scatter-add).
    """
    if token_A.shape != expert_A.shape or token_A.dim() != 1:
        raise ValueError(f"token_A and expert_A must be 1-D of equal length, got {tuple(token_A.shape)} and {tuple(expert_A.shape)}")
    order_A, counts_E = sort_by_expert(expert_A.long(), num_experts)
    x_AD = x_TD.index_select(0, token_A.long().index_select(0, order_A))
    return x_AD, order_A, counts_E


def unpermute(y_AD: Tensor, order_A: Tensor, token_A: Tensor, gate_A: Tensor, num_tokens: int) -> Tensor:
    """Weight expert outputs by their gates and sum them back per token.

    Args:
        y_AD: expert outputs in the sorted order produced by :func:`permute`.
        order_A: the permutation returned by :func:`permute`.
        token_A: token index of every assignment in the *original* order.
        gate_A: gate weight of every assignment in the *original* order.
        num_tokens: T.

    Returns:
        y_TD with ``y_TD[t] = sum_{a: token_A[a] = t} gate_A[a] * y_AD[pos(a)]``, in
        ``y_AD``'s dtype. Tokens with no assignment get zeros. Differentiable in
        ``y_AD`` and ``gate_A``.
    """
    tok_A = token_A.long().index_select(0, order_A)
    g_A = gate_A.index_select(0, order_A)
    return gated_scatter_add(y_AD, g_A, tok_A, num_tokens)


def permute_reference(x_TD: Tensor, token_A: Tensor, expert_A: Tensor, num_experts: int) -> tuple[Tensor, Tensor, Tensor]:
    """Plain loop reference for :func:`permute` (slow; tests only)."""
    rows, order, counts = [], [], []
    for e in range(num_experts):
        n = 0
        for a in range(expert_A.numel()):
            if int(expert_A[a]) == e:
                rows.append(x_TD[int(token_A[a])])
                order.append(a)
                n += 1
        counts.append(n)
    x_AD = torch.stack(rows) if rows else x_TD.new_zeros(0, x_TD.shape[-1])
    return x_AD, torch.tensor(order, dtype=torch.long), torch.tensor(counts, dtype=torch.long)


def unpermute_reference(y_AD: Tensor, order_A: Tensor, token_A: Tensor, gate_A: Tensor, num_tokens: int) -> Tensor:
    """Plain loop reference for :func:`unpermute` (slow; tests only)."""
    out = [y_AD.new_zeros(y_AD.shape[-1]) for _ in range(num_tokens)]
    for i in range(order_A.numel()):
        a = int(order_A[i])
        t = int(token_A[a])
        out[t] = out[t] + gate_A[a].to(y_AD.dtype) * y_AD[i]
    return torch.stack(out) if out else y_AD.new_zeros(0, y_AD.shape[-1])
