"""Autograd wrappers around the Triton grouped GEMM kernels (``moex.kernels.grouped_gemm``):
the grouped GEMM op, and the whole expert MLP with the token gathers fused into its GEMMs.

Shape key: A rows (sorted by expert), E experts, K in-features, N out-features.

Forward ``y = x @ w[e]``; backward ``dx = dy @ w[e]^T`` (the same row kernel reading w
transposed through its strides) and ``dw[e] = x_e^T @ dy_e`` (the weight-gradient kernel).
Block sizes are module-level settings (:func:`configure`) so interpreter tests stay tiny.
"""

from __future__ import annotations

import importlib

import torch
from torch import Tensor

from moex.ops import activations

__all__ = ["triton_grouped_mm", "triton_expert_mlp", "configure", "block_sizes", "kernel_module"]

_BLOCKS = {"block_m": 64, "block_n": 64, "block_k": 32}


def kernel_module():
    """The kernel module ``moex.kernels.grouped_gemm`` (imported lazily: it imports triton)."""
    return importlib.import_module("moex.kernels.grouped_gemm")


def configure(*, block_m: int | None = None, block_n: int | None = None, block_k: int | None = None) -> dict:
    """Set the Triton block sizes used by the ``triton`` backend; returns the previous settings."""
    old = dict(_BLOCKS)
    for k, v in (("block_m", block_m), ("block_n", block_n), ("block_k", block_k)):
        if v is not None:
            if v < 1 or v & (v - 1):
                raise ValueError(f"{k} must be a power of two, got {v}")
            _BLOCKS[k] = v
    return old


def block_sizes() -> dict:
    """The current block sizes."""
    return dict(_BLOCKS)


class _TritonGroupedMM(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_AK, w_EKN, counts_E, blocks):
        ctx.save_for_backward(x_AK, w_EKN, counts_E)
        ctx.blocks = blocks
        return kernel_module().gmm_rows(x_AK, w_EKN, counts_E, **blocks)

    @staticmethod
    def backward(ctx, dy_AN):
        x_AK, w_EKN, counts_E = ctx.saved_tensors
        km, blocks = kernel_module(), ctx.blocks
        dx = km.gmm_rows(dy_AN, w_EKN.transpose(1, 2), counts_E, **blocks) if ctx.needs_input_grad[0] else None
        dw = km.gmm_wgrad(x_AK, dy_AN, counts_E, **blocks) if ctx.needs_input_grad[1] else None
        return dx, dw, None, None


def triton_grouped_mm(x_AK: Tensor, w_EKN: Tensor, counts_E: Tensor, **blocks) -> Tensor:
    """Differentiable Triton grouped GEMM ``y_AN[a] = x_AK[a] @ w_EKN[e(a)]``.

    ``blocks`` (block_m/block_n/block_k) override :func:`configure` for this call.
    Needs CUDA tensors, or CPU tensors with triton imported under ``TRITON_INTERPRET=1``.
    """
    km = kernel_module()
    if x_AK.device.type != "cuda" and not km.interpreted():
        raise RuntimeError("triton grouped GEMM needs CUDA tensors, or TRITON_INTERPRET=1 set before triton "
                           "was first imported (kernels were compiled in non-interpreter mode)")
    return _TritonGroupedMM.apply(x_AK, w_EKN, counts_E, {**_BLOCKS, **blocks})


class _TritonExpertMLP(torch.autograd.Function):
    """The expert MLP on the Triton kernels, with the token gathers fused into the GEMMs.

    Forward reads x rows by token index inside the W1 kernel and the backward reads the
    upstream gradient rows the same way (for dh and dW2) and x rows again for dW1, so no
    (S, D) gathered copy is ever written; only the two scatter-adds remain as passes.
    """

    @staticmethod
    def forward(ctx, x_TD, token_S, gate_S, w1_EDH, w2_EHD, w3_EDH, counts_E, act, blocks):
        km = kernel_module()
        T, D = x_TD.shape
        if w3_EDH is not None:  # SwiGLU: both projections and the gating in one kernel
            pre_SH, up_SH, h_SH = km.gmm_swiglu_rows(x_TD, w1_EDH, w3_EDH, counts_E, rows=token_S, **blocks)
        else:
            up_SH = None
            pre_SH = km.gmm_rows(x_TD, w1_EDH, counts_E, rows=token_S, **blocks)
            h_SH = activations.code_forward(act, pre_SH)  # ReLU: in place, pre_SH is the code
        hw_SH = h_SH * gate_S.to(x_TD.dtype).unsqueeze(-1)
        y_SD = km.gmm_rows(hw_SH, w2_EHD, counts_E, **blocks)
        y_TD = x_TD.new_zeros(T, D).index_add_(0, token_S, y_SD)
        ctx.save_for_backward(x_TD, token_S, gate_S, w1_EDH, w2_EHD, w3_EDH, counts_E,
                              h_SH if act == "relu" else pre_SH, up_SH)
        ctx.act, ctx.blocks = act, blocks
        ctx.mark_non_differentiable(h_SH)
        ctx.set_materialize_grads(False)
        return y_TD, h_SH

    @staticmethod
    def backward(ctx, g_TD, _g_h):
        if g_TD is None:
            return (None,) * 9
        x_TD, token_S, gate_S, w1_EDH, w2_EHD, w3_EDH, counts_E, saved_SH, up_SH = ctx.saved_tensors
        km, blocks, act = kernel_module(), ctx.blocks, ctx.act
        need = ctx.needs_input_grad
        g_TD = g_TD.contiguous()
        g_S1 = gate_S.to(x_TD.dtype).unsqueeze(-1)
        h_SH = activations.recompute_code(act, saved_SH, up_SH)
        ghw_SH = km.gmm_rows(g_TD, w2_EHD.transpose(1, 2), counts_E, rows=token_S, **blocks)
        d_gate = (ghw_SH * h_SH).sum(-1).to(gate_S.dtype) if need[2] else None
        d_w2 = km.gmm_wgrad(h_SH * g_S1, g_TD, counts_E, dy_rows=token_S, **blocks) if need[4] else None
        gpre_SH, gup_SH = activations.code_backward(act, ghw_SH.mul_(g_S1), saved_SH, up_SH)
        d_w1 = km.gmm_wgrad(x_TD, gpre_SH, counts_E, x_rows=token_S, **blocks) if need[3] else None
        d_w3 = None
        if w3_EDH is not None and need[5]:
            d_w3 = km.gmm_wgrad(x_TD, gup_SH, counts_E, x_rows=token_S, **blocks)
        d_x = None
        if need[0]:
            gx_SD = km.gmm_rows(gpre_SH, w1_EDH.transpose(1, 2), counts_E, **blocks)
            if gup_SH is not None:
                gx_SD += km.gmm_rows(gup_SH, w3_EDH.transpose(1, 2), counts_E, **blocks)
            d_x = torch.zeros_like(x_TD).index_add_(0, token_S, gx_SD)
        return d_x, None, d_gate, d_w1, d_w2, d_w3, None, None, None


def triton_expert_mlp(x_TD: Tensor, token_S: Tensor, gate_S: Tensor, counts_E: Tensor, w1_EDH: Tensor,
                      w2_EHD: Tensor, act: str = "relu", *, w3_EDH: Tensor | None = None,
                      **blocks) -> tuple[Tensor, Tensor]:
    """:func:`moex.ops.expert_mlp` on the Triton kernels (gathers fused into the GEMMs).

    Needs CUDA tensors, or CPU tensors with triton imported under ``TRITON_INTERPRET=1``.
    """
    km = kernel_module()
    if x_TD.device.type != "cuda" and not km.interpreted():
        raise RuntimeError("triton expert MLP needs CUDA tensors, or TRITON_INTERPRET=1 set before triton "
                           "was first imported")
    if w3_EDH is not None and w3_EDH.stride() != w1_EDH.stride():
        w1_EDH, w3_EDH = w1_EDH.contiguous(), w3_EDH.contiguous()  # the SwiGLU kernel reads both with one stride set
    return _TritonExpertMLP.apply(x_TD.contiguous(), token_S, gate_S, w1_EDH, w2_EHD, w3_EDH,
                                  counts_E.to(x_TD.device), act, {**_BLOCKS, **blocks})
