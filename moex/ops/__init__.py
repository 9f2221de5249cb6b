"""Autograd-level MoE ops: token permutation, grouped GEMM with selectable backends, the fused expert MLP."""

from moex.ops.grouped_gemm import (
    BACKENDS,
    BackendUnavailable,
    available_backends,
    grouped_mm,
    grouped_mm_reference,
    resolve_backend,
)
from moex.ops.expert_mlp import FUSED_IMPL, count_active, expert_mlp, expert_mlp_reference
from moex.ops.fused import (
    gated_scatter_add,
    gated_scatter_add_reference,
    scatter_add_rows,
    scatter_add_rows_reference,
    sort_by_expert,
    sort_by_expert_reference,
)
from moex.ops.permute import permute, permute_reference, unpermute, unpermute_reference

__all__ = [
    "BACKENDS",
    "BackendUnavailable",
    "available_backends",
    "grouped_mm",
    "grouped_mm_reference",
    "resolve_backend",
    "permute",
    "permute_reference",
    "unpermute",
    "unpermute_reference",
    "sort_by_expert",
    "sort_by_expert_reference",
    "scatter_add_rows",
    "scatter_add_rows_reference",
    "gated_scatter_add",
    "gated_scatter_add_reference",
    "expert_mlp",
    "expert_mlp_reference",
    "count_active",
    "FUSED_IMPL",
]
