"""Autograd wrapper around the Triton grouped GEMM kernels (``moex.kernels.grouped_gemm``).

Shape key: A rows (sorted by expert), E experts, K in-features, N out-features.

Forward ``y = x @ w[e]``; backward ``dx = dy @ w[e]^T`` (the same row kernel reading w
transposed through its strides) and ``dw[e] = x_e^T @ dy_e`` (the weight-gradient kernel).
Block sizes are module-level settings (:func:`configure`) so interpreter tests stay tiny.
"""

from __future__ import annotations

import importlib

import torch
from torch import Tensor

__all__ = ["triton_grouped_mm", "configure", "block_sizes", "kernel_module"]

_BLOCKS = {"block_m": 64, "block_n": 64, "block_k": 32}


def kernel_module():
    """The kernel module: ``moex.kernels.grouped_gemm`` when installed, else the source tree's ``kernels``."""
    try:
        return importlib.import_module("moex.kernels.grouped_gemm")
    except ModuleNotFoundError:
        return importlib.import_module("kernels.grouped_gemm")


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
