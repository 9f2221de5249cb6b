"""Autograd-level MoE ops: the activation table, grouping assignments by expert and combining
them back, grouped GEMM with selectable backends, and the fused expert MLP."""

from moex.ops.grouped_gemm import (
    BACKENDS,
    BackendUnavailable,
    available_backends,
    grouped_mm,
    grouped_mm_reference,
    resolve_backend,
)
from moex.ops.expert_mlp import FUSED_IMPL, count_active, expert_mlp, expert_mlp_reference
from moex.ops.dispatch_combine import (
    gated_scatter_add,
    gated_scatter_add_reference,
    scatter_add_rows,
    scatter_add_rows_reference,
    sort_by_expert,
    sort_by_expert_reference,
)

__all__ = [
    "BACKENDS",
    "BackendUnavailable",
    "available_backends",
    "grouped_mm",
    "grouped_mm_reference",
    "resolve_backend",
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
