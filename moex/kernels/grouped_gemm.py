"""Triton grouped GEMM kernels for expert-sorted rows (MegaBlocks/ScatterMoE style).

Shape key: A rows (sorted by expert), E experts, K in-features, N out-features,
P row tiles (one program row per BLOCK_M rows of one expert).

- ``gmm_rows(x_AK, b_EKN, counts_E)``: ``y[a] = x[a] @ b[e(a)]``. ``b`` is read through
  its strides, so ``gmm_rows(dy_AN, w_EKN.transpose(1, 2), counts_E)`` is the dx GEMM.
- ``gmm_swiglu_rows(x_AK, w1_EKN, w3_EKN, counts_E)``: SwiGLU's first layer, both
  projections in one pass over x and ``h = silu(x @ w1[e]) * (x @ w3[e])`` as the epilogue;
  returns (pre, up, h) (backward reads pre and up).
- ``gmm_wgrad(x_AK, dy_AN, counts_E)``: ``dw[e] = x[rows of e]^T @ dy[rows of e]``; empty
  experts get zeros.

Both take optional gather indices (ScatterMoE's idea): with ``rows=token_A`` the A
operand's row ``a`` is read as ``x[token_A[a]]`` straight from the (T, K) token
matrix inside the kernel, so the (A, K) gathered copy is never written to memory.

Both accumulate in fp32. The tile schedule is built with tensor ops on the device
(no host sync): P is bounded by cdiv(A, BLOCK_M) + E and surplus tiles are fully masked.
Under ``TRITON_INTERPRET=1`` (CPU tensors) operands are upcast to fp32 before ``tl.dot``
because the interpreter's bf16 dot is wrong. The plain references are
``moex.ops.grouped_gemm.grouped_mm_reference`` and the per-expert products in the tests.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor



@triton.jit
def _mma(acc, a, b, UPCAST: tl.constexpr, ALLOW_TF32: tl.constexpr):
    """acc + a @ b in fp32 (operands upcast first under the interpreter, whose bf16 dot is wrong)."""
    if UPCAST:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    if ALLOW_TF32:
        acc += tl.dot(a, b, input_precision="tf32")
    else:
        acc += tl.dot(a, b, input_precision="ieee")
    return acc


@triton.jit
def _row_tile(rows_ptr, tile_expert_ptr, tile_row_ptr, tile_end_ptr, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
              BLOCK_K: tl.constexpr, GATHER: tl.constexpr):
    """This program's row tile: its expert, row/column/k offsets, masks and operand source rows."""
    pid_p = tl.program_id(0)
    pid_n = tl.program_id(1)
    e = tl.load(tile_expert_ptr + pid_p)
    row0 = tl.load(tile_row_ptr + pid_p)
    end = tl.load(tile_end_ptr + pid_p)
    rm = row0 + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    m_ok = rm < end
    n_ok = rn < N
    if GATHER:  # row a of the operand is x[rows[a]]
        src = tl.load(rows_ptr + rm, mask=m_ok, other=0).to(tl.int64)
    else:
        src = rm.to(tl.int64)
    return e, rm, rn, rk, m_ok, n_ok, src


@triton.jit
def _gmm_rows_kernel(x_ptr, rows_ptr, b_ptr, y_ptr, tile_expert_ptr, tile_row_ptr, tile_end_ptr, N, K,
                     stride_xm, stride_xk, stride_be, stride_bk, stride_bn, stride_ym, stride_yn,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                     GATHER: tl.constexpr, UPCAST: tl.constexpr, ALLOW_TF32: tl.constexpr):
    e, rm, rn, rk, m_ok, n_ok, src = _row_tile(rows_ptr, tile_expert_ptr, tile_row_ptr, tile_end_ptr, N,
                                                BLOCK_M, BLOCK_N, BLOCK_K, GATHER)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k_ok = (k0 + rk) < K
        a = tl.load(x_ptr + src[:, None] * stride_xm + (k0 + rk)[None, :] * stride_xk,
                    mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        b = tl.load(b_ptr + e * stride_be + (k0 + rk)[:, None] * stride_bk + rn[None, :] * stride_bn,
                    mask=k_ok[:, None] & n_ok[None, :], other=0.0)
        acc = _mma(acc, a, b, UPCAST, ALLOW_TF32)
    tl.store(y_ptr + rm[:, None] * stride_ym + rn[None, :] * stride_yn,
             acc.to(y_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


@triton.jit
def _gmm_swiglu_kernel(x_ptr, rows_ptr, w1_ptr, w3_ptr, pre_ptr, up_ptr, h_ptr, tile_expert_ptr, tile_row_ptr,
                       tile_end_ptr, N, K, stride_xm, stride_xk, stride_we, stride_wk, stride_wn, stride_ym, stride_yn,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                       GATHER: tl.constexpr, UPCAST: tl.constexpr, ALLOW_TF32: tl.constexpr):
    """Both SwiGLU projections of a row tile in one pass over x, with the gating as epilogue:
    pre = x @ w1[e], up = x @ w3[e], h = silu(pre) * up (w1 and w3 share strides)."""
    e, rm, rn, rk, m_ok, n_ok, src = _row_tile(rows_ptr, tile_expert_ptr, tile_row_ptr, tile_end_ptr, N,
                                                BLOCK_M, BLOCK_N, BLOCK_K, GATHER)
    acc1 = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc3 = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k_ok = (k0 + rk) < K
        a = tl.load(x_ptr + src[:, None] * stride_xm + (k0 + rk)[None, :] * stride_xk,
                    mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        w_off = e * stride_we + (k0 + rk)[:, None] * stride_wk + rn[None, :] * stride_wn
        w_ok = k_ok[:, None] & n_ok[None, :]
        acc1 = _mma(acc1, a, tl.load(w1_ptr + w_off, mask=w_ok, other=0.0), UPCAST, ALLOW_TF32)
        acc3 = _mma(acc3, a, tl.load(w3_ptr + w_off, mask=w_ok, other=0.0), UPCAST, ALLOW_TF32)
    pre = acc1.to(pre_ptr.dtype.element_ty)
    up = acc3.to(up_ptr.dtype.element_ty)
    # the code from the rounded pre/up that backward reads, so forward and backward agree
    pre32 = pre.to(tl.float32)
    h = pre32 / (1.0 + tl.exp(-pre32)) * up.to(tl.float32)
    out = rm[:, None] * stride_ym + rn[None, :] * stride_yn
    ok = m_ok[:, None] & n_ok[None, :]
    tl.store(pre_ptr + out, pre, mask=ok)
    tl.store(up_ptr + out, up, mask=ok)
    tl.store(h_ptr + out, h.to(h_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _gmm_wgrad_kernel(x_ptr, xrows_ptr, dy_ptr, dyrows_ptr, dw_ptr, starts_ptr, ends_ptr, N, K,
                      stride_xm, stride_xk, stride_dm, stride_dn, stride_we, stride_wk, stride_wn,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                      GATHER_X: tl.constexpr, GATHER_DY: tl.constexpr,
                      UPCAST: tl.constexpr, ALLOW_TF32: tl.constexpr):
    e = tl.program_id(0)
    pid_k = tl.program_id(1)
    pid_n = tl.program_id(2)
    start = tl.load(starts_ptr + e)
    end = tl.load(ends_ptr + e)
    rk = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    k_ok = rk < K
    n_ok = rn < N
    acc = tl.zeros((BLOCK_K, BLOCK_N), dtype=tl.float32)
    for m0 in range(start, end, BLOCK_M):
        rm = m0 + tl.arange(0, BLOCK_M)
        m_ok = rm < end
        if GATHER_X:
            xm = tl.load(xrows_ptr + rm, mask=m_ok, other=0).to(tl.int64)
        else:
            xm = rm.to(tl.int64)
        if GATHER_DY:
            dm = tl.load(dyrows_ptr + rm, mask=m_ok, other=0).to(tl.int64)
        else:
            dm = rm.to(tl.int64)
        xt = tl.load(x_ptr + xm[None, :] * stride_xm + rk[:, None] * stride_xk,
                     mask=k_ok[:, None] & m_ok[None, :], other=0.0)
        dy = tl.load(dy_ptr + dm[:, None] * stride_dm + rn[None, :] * stride_dn,
                     mask=m_ok[:, None] & n_ok[None, :], other=0.0)
        acc = _mma(acc, xt, dy, UPCAST, ALLOW_TF32)
    tl.store(dw_ptr + e * stride_we + rk[:, None] * stride_wk + rn[None, :] * stride_wn,
             acc.to(dw_ptr.dtype.element_ty), mask=k_ok[:, None] & n_ok[None, :])


def interpreted() -> bool:
    """True when these kernels run in triton's interpreter (CPU tensors): they were decorated
    with TRITON_INTERPRET=1 set before triton's first import, and it is still set."""
    from triton.language import standard
    from triton.runtime.interpreter import InterpretedFunction

    # triton's own jit'd helpers are decorated when triton is imported: they must be interpreted too
    return (isinstance(_gmm_rows_kernel, InterpretedFunction) and isinstance(standard.sum, InterpretedFunction)
            and bool(triton.knobs.runtime.interpret))


def tile_schedule(counts_E: Tensor, num_rows: int, block_m: int) -> tuple[Tensor, Tensor, Tensor]:
    """Row tiles of BLOCK_M rows that never straddle two experts, built without a host sync.

    Returns (tile_expert_P, tile_row_P, tile_end_P) as int32, P = cdiv(A, block_m) + E;
    tiles past the real ones get row = end = 0 (fully masked).
    """
    counts = counts_E.to(torch.int64)
    E = counts.numel()
    ends_E = torch.cumsum(counts, 0)
    starts_E = ends_E - counts
    tiles_E = (counts + block_m - 1) // block_m
    tile_ends_E = torch.cumsum(tiles_E, 0)
    P = triton.cdiv(num_rows, block_m) + E
    t_P = torch.arange(P, device=counts.device)
    e_P = torch.searchsorted(tile_ends_E, t_P, right=True)
    valid_P = e_P < E
    e_P = e_P.clamp_max(max(E - 1, 0))
    first_tile_P = tile_ends_E[e_P] - tiles_E[e_P]
    row_P = torch.where(valid_P, starts_E[e_P] + (t_P - first_tile_P) * block_m, 0)
    end_P = torch.where(valid_P, ends_E[e_P], 0)
    return e_P.to(torch.int32), row_P.to(torch.int32), end_P.to(torch.int32)


def _flags(dtype: torch.dtype) -> dict:
    interp = interpreted()
    return dict(UPCAST=interp, ALLOW_TF32=dtype == torch.float32 and not interp
                and torch.backends.cuda.matmul.allow_tf32)


def gmm_rows(x_AK: Tensor, b_EKN: Tensor, counts_E: Tensor, *, rows: Tensor | None = None, block_m: int = 64,
             block_n: int = 64, block_k: int = 32) -> Tensor:
    """y_AN[a] = x_AK[a] @ b_EKN[e(a)] for expert-sorted rows (b may be any strided view).

    With ``rows`` (A int indices) the operand is gathered in the kernel: y[a] = x[rows[a]] @ b[e(a)]
    and x may have any number of rows.
    """
    A, K = (rows.numel(), x_AK.shape[1]) if rows is not None else x_AK.shape
    E, _, N = b_EKN.shape
    y_AN = torch.empty(A, N, device=x_AK.device, dtype=x_AK.dtype)
    if A == 0 or N == 0 or E == 0:
        return y_AN
    tile_e, tile_row, tile_end = tile_schedule(counts_E.to(x_AK.device), A, block_m)
    grid = (tile_e.numel(), triton.cdiv(N, block_n))
    _gmm_rows_kernel[grid](x_AK, x_AK if rows is None else rows, b_EKN, y_AN, tile_e, tile_row, tile_end, N, K,
                           x_AK.stride(0), x_AK.stride(1), *b_EKN.stride(), *y_AN.stride(),
                           BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, GATHER=rows is not None,
                           **_flags(x_AK.dtype))
    return y_AN


def gmm_swiglu_rows(x_AK: Tensor, w1_EKN: Tensor, w3_EKN: Tensor, counts_E: Tensor, *, rows: Tensor | None = None,
                    block_m: int = 64, block_n: int = 64, block_k: int = 32) -> tuple[Tensor, Tensor, Tensor]:
    """SwiGLU's first layer in one kernel: (pre, up, h) with pre = x @ w1[e], up = x @ w3[e] and
    h = silu(pre) * up, for expert-sorted rows (``rows`` gathers x in the kernel as in :func:`gmm_rows`)."""
    A, K = (rows.numel(), x_AK.shape[1]) if rows is not None else x_AK.shape
    E, _, N = w1_EKN.shape
    if w3_EKN.shape != w1_EKN.shape or w3_EKN.stride() != w1_EKN.stride():
        raise ValueError(f"w1 {tuple(w1_EKN.shape)} and w3 {tuple(w3_EKN.shape)} must have equal shapes and strides")
    pre_AN, up_AN, h_AN = (torch.empty(A, N, device=x_AK.device, dtype=x_AK.dtype) for _ in range(3))
    if A == 0 or N == 0 or E == 0:
        return pre_AN, up_AN, h_AN
    tile_e, tile_row, tile_end = tile_schedule(counts_E.to(x_AK.device), A, block_m)
    grid = (tile_e.numel(), triton.cdiv(N, block_n))
    _gmm_swiglu_kernel[grid](x_AK, x_AK if rows is None else rows, w1_EKN, w3_EKN, pre_AN, up_AN, h_AN, tile_e,
                             tile_row, tile_end, N, K, x_AK.stride(0), x_AK.stride(1), *w1_EKN.stride(),
                             *pre_AN.stride(), BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
                             GATHER=rows is not None, **_flags(x_AK.dtype))
    return pre_AN, up_AN, h_AN


def gmm_wgrad(x_AK: Tensor, dy_AN: Tensor, counts_E: Tensor, *, x_rows: Tensor | None = None,
              dy_rows: Tensor | None = None, block_m: int = 64, block_n: int = 64, block_k: int = 32) -> Tensor:
    """dw_EKN[e] = x_AK[rows of e]^T @ dy_AN[rows of e]; zeros for empty experts.

    ``x_rows`` / ``dy_rows`` gather that operand in the kernel (row a is x[x_rows[a]]).
    """
    K, N, E = x_AK.shape[1], dy_AN.shape[1], counts_E.numel()
    dw_EKN = torch.empty(E, K, N, device=x_AK.device, dtype=x_AK.dtype)
    if E == 0 or K == 0 or N == 0:
        return dw_EKN
    counts = counts_E.to(device=x_AK.device, dtype=torch.int64)
    ends_E = torch.cumsum(counts, 0)
    starts_E = (ends_E - counts).to(torch.int32)
    grid = (E, triton.cdiv(K, block_k), triton.cdiv(N, block_n))
    _gmm_wgrad_kernel[grid](x_AK, x_AK if x_rows is None else x_rows, dy_AN, dy_AN if dy_rows is None else dy_rows,
                            dw_EKN, starts_E, ends_E.to(torch.int32), N, K,
                            x_AK.stride(0), x_AK.stride(1), dy_AN.stride(0), dy_AN.stride(1), *dw_EKN.stride(),
                            BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, GATHER_X=x_rows is not None,
                            GATHER_DY=dy_rows is not None, **_flags(x_AK.dtype))
    return dw_EKN
