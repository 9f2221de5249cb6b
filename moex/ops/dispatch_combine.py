"""Index-only dispatch/combine ops for the MoE hot path: group assignments by expert, add rows back onto tokens.

Shape key: T tokens, D model dim, E experts, A assignments (any order),
S kept assignments sorted by expert (S = A when nothing is dropped).

Why these exist (measured on a 2-core CPU, see benchmarks/README.md): the expert
GEMMs run near dense speed; what costs is every extra pass over an (A, D) tensor
(each fresh (A, D) allocation page-faults). So:

- :func:`sort_by_expert` sorts once; the capacity cut reuses that sort.
- :func:`scatter_add_rows` is the unweighted combine (gate already folded into the
  expert hidden layer, an (A, H) multiply instead of (A, D)); autograd saves only
  the index.
- :func:`gated_scatter_add` is the weighted combine for when the gate cannot be
  folded (expert-parallel dispatch): a custom autograd Function that saves the
  rows and gates it needs and reuses the gathered gradient buffer in place.

Each has a plain PyTorch reference next to it (tests/test_dispatch_combine.py).
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = [
    "sort_by_expert",
    "sort_by_expert_reference",
    "scatter_add_rows",
    "scatter_add_rows_reference",
    "gated_scatter_add",
    "gated_scatter_add_reference",
]


def sort_by_expert(expert_A: Tensor, num_experts: int) -> tuple[Tensor, Tensor]:
    """Stable order that groups assignments by expert, and the per-expert counts.

    Returns ``order_A`` (int64; sorted position i holds assignment ``order_A[i]``) and
    ``counts_E`` (int64, sums to A). Keys are small ints, so the sort runs on int32
    keys (half the bytes of int64; same stable result).
    """
    if expert_A.dim() != 1:
        raise ValueError(f"expert_A must be 1-D, got {tuple(expert_A.shape)}")
    counts_E = torch.bincount(expert_A, minlength=num_experts)
    if counts_E.numel() != num_experts:
        raise ValueError(f"expert index out of range: got up to {counts_E.numel() - 1} with num_experts={num_experts}")
    keys_A = expert_A.to(torch.int32) if num_experts < 2**31 else expert_A
    order_A = torch.sort(keys_A, stable=True).indices
    return order_A, counts_E


def sort_by_expert_reference(expert_A: Tensor, num_experts: int) -> tuple[Tensor, Tensor]:
    """Loop reference: expert 0's assignments in original order, then expert 1's, ..."""
    order = [a for e in range(num_experts) for a in range(expert_A.numel()) if int(expert_A[a]) == e]
    counts = [sum(int(v) == e for v in expert_A) for e in range(num_experts)]
    return torch.tensor(order, dtype=torch.long), torch.tensor(counts, dtype=torch.long)


def scatter_add_rows(y_SD: Tensor, token_S: Tensor, num_tokens: int) -> Tensor:
    """``y_TD[t] = sum_{s: token_S[s] = t} y_SD[s]`` (zeros for tokens with no row).

    Differentiable in ``y_SD``; the backward is the gather ``g_TD[token_S]`` and
    autograd keeps only ``token_S``.
    """
    return y_SD.new_zeros(num_tokens, y_SD.shape[-1]).index_add_(0, token_S, y_SD)


def scatter_add_rows_reference(y_SD: Tensor, token_S: Tensor, num_tokens: int) -> Tensor:
    """Loop reference for :func:`scatter_add_rows`."""
    out = [y_SD.new_zeros(y_SD.shape[-1]) for _ in range(num_tokens)]
    for s in range(token_S.numel()):
        out[int(token_S[s])] = out[int(token_S[s])] + y_SD[s]
    return torch.stack(out) if out else y_SD.new_zeros(0, y_SD.shape[-1])


class _GatedScatterAdd(torch.autograd.Function):
    @staticmethod
    def forward(ctx, y_SD: Tensor, gate_S: Tensor, token_S: Tensor, num_tokens: int) -> Tensor:
        g_S = gate_S.to(y_SD.dtype)
        out_TD = y_SD.new_zeros(num_tokens, y_SD.shape[-1]).index_add_(0, token_S, y_SD * g_S.unsqueeze(-1))
        ctx.save_for_backward(y_SD, g_S, token_S)
        ctx.gate_dtype = gate_S.dtype
        return out_TD

    @staticmethod
    def backward(ctx, g_TD: Tensor):
        y_SD, g_S, token_S = ctx.saved_tensors
        gy_SD = g_TD.index_select(0, token_S)  # one fresh (S, D) buffer, reused below
        d_gate = None
        if ctx.needs_input_grad[1]:
            d_gate = (gy_SD * y_SD).sum(-1).to(ctx.gate_dtype)
        d_y = gy_SD.mul_(g_S.unsqueeze(-1)) if ctx.needs_input_grad[0] else None
        return d_y, d_gate, None, None


def gated_scatter_add(y_SD: Tensor, gate_S: Tensor, token_S: Tensor, num_tokens: int) -> Tensor:
    """``y_TD[t] = sum_{s: token_S[s] = t} gate_S[s] * y_SD[s]`` in ``y_SD``'s dtype.

    Differentiable in ``y_SD`` and ``gate_S``; the backward gathers the upstream
    gradient once and scales it in place.
    """
    return _GatedScatterAdd.apply(y_SD, gate_S, token_S, num_tokens)


def gated_scatter_add_reference(y_SD: Tensor, gate_S: Tensor, token_S: Tensor, num_tokens: int) -> Tensor:
    """Loop reference for :func:`gated_scatter_add`."""
    out = [y_SD.new_zeros(y_SD.shape[-1]) for _ in range(num_tokens)]
    for s in range(token_S.numel()):
        t = int(token_S[s])
        out[t] = out[t] + gate_S[s].to(y_SD.dtype) * y_SD[s]
    return torch.stack(out) if out else y_SD.new_zeros(0, y_SD.shape[-1])
