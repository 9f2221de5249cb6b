"""The whole expert MLP as one op: gather -> W1 -> act -> gate -> W2 -> scatter-add.

Shape key: T tokens, D model dim, E experts, H hidden units per expert,
S assignment rows sorted by expert (``counts_E`` rows for each), n rows in one block.

``expert_mlp(x_TD, token_S, gate_S, counts_E, w1_EDH, w2_EHD, act)`` computes

    y_TD[t] = sum_{s: token_S[s] = t} gate_S[s] * code(x_TD[t]; e(s)) @ w2[e(s)]

with ``code = act(x @ w1[e])``, or ``silu(x @ w1[e]) * (x @ w3[e])`` for SwiGLU experts
(``w3_EDH=``), and returns it with the (S, H) hidden code. It is the CPU hot path
of the MoE layer (``gemm_backend=auto|fused``); the composition of
:func:`moex.ops.grouped_mm` and the permutation ops is its reference
(:func:`expert_mlp_reference`, tests/test_expert_mlp.py).

Why one op (measured, benchmarks/results/moe_layer.md): on a CPU the expert GEMMs
already run near matmul speed; what made the layer slower than a dense MLP was every
extra pass over (S, D) tensors -- the gathered inputs, the expert outputs, their
gradients -- each freshly allocated (page faults) and streamed through DRAM. Here
the work runs in blocks of at most ``block_rows`` rows of one expert:

- the gather, both GEMMs and the scatter-add of a block touch only block-sized
  buffers that are reused for every block, so they stay in cache;
- autograd saves only the (S, H) hidden code (as a dense MLP saves its (T, k*H)
  one), the token index and the gates: x_SD is gathered again in backward instead
  of being kept, so activation memory is the dense MLP's, not k*D wider;
- weight gradients are written by GEMMs with ``out=``/``addmm_`` straight into
  the (E, D, H) and (E, H, D) gradient tensors (no zero-fill pass, no copies).

The loop over experts is in Python: ~15 small ops per block, a cost that grows with
E and stays small next to the GEMMs it drives (benchmarks/results/moe_layer.md). On CUDA, ``impl="triton"`` runs the
same op as a few grouped kernels with the gathers inside them
(:func:`moex.ops.triton_gmm.triton_expert_mlp`) instead of one launch per block.
"""

from __future__ import annotations

import logging

import torch
from torch import Tensor

from moex.ops import activations
from moex.ops.grouped_gemm import BACKENDS, BackendUnavailable, grouped_mm_reference
from moex.ops.triton_gmm import triton_expert_mlp

__all__ = ["expert_mlp", "expert_mlp_reference", "count_active", "DEFAULT_BLOCK_ROWS", "FUSED_IMPL", "ImplChoice"]

log = logging.getLogger(__name__)

DEFAULT_BLOCK_ROWS = 1024  # rows per block: (n, D) + 2 x (n, H) fp32 buffers stay in L2/L3


_INT_VIEW = {2: torch.int16, 4: torch.int32, 8: torch.int64}


def count_active(h: Tensor, *, relu_code: bool = False) -> Tensor:
    """Number of entries > 0 in a hidden code (exact for any non-NaN floats).

    Counts on the integer view of the bits: a float is > 0 exactly when its bit
    pattern, read as a signed int, is > 0 (-0.0 and negatives have the sign bit).
    ``clamp_min(0)`` + ``count_nonzero`` are vectorised on CPU where ``(h > 0).sum()``'s
    bool reduction is not. With ``relu_code=True`` (a ReLU code from :func:`expert_mlp`,
    which writes +0.0 for every inactive unit) the clamp is skipped too.
    """
    if h.element_size() not in _INT_VIEW or not h.is_contiguous() or not h.is_floating_point():
        return (h > 0).sum()
    bits = h.view(_INT_VIEW[h.element_size()])
    return torch.count_nonzero(bits if relu_code else bits.clamp_min(0))


def _blocks(counts: list[int], block_rows: int):
    """(expert, start, stop, first block of this expert) over the sorted rows."""
    start = 0
    for e, n in enumerate(counts):
        for a in range(start, start + n, block_rows):
            yield e, a, min(a + block_rows, start + n), a == start
        start += n


class _ExpertMLP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_TD, token_S, gate_S, w1_EDH, w2_EHD, w3_EDH, counts, act, block_rows):
        T, D = x_TD.shape
        S, H = token_S.numel(), w1_EDH.shape[2]
        g_S1 = gate_S.to(x_TD.dtype).unsqueeze(-1)
        n_max = min(block_rows, max(counts, default=0))
        buf_nD, buf_nH = x_TD.new_empty(n_max, D), x_TD.new_empty(n_max, H)
        # ReLU's derivative is readable from its output, so only the output is kept;
        # other activations keep their input (saved_SH; SwiGLU also up_SH) and write the code to h_SH.
        saved_SH = x_TD.new_empty(S, H)
        up_SH = x_TD.new_empty(S, H) if w3_EDH is not None else None
        h_SH = saved_SH if act == "relu" else x_TD.new_empty(S, H)
        y_TD = x_TD.new_zeros(T, D)
        for e, a, b, _ in _blocks(counts, block_rows):
            n, tok = b - a, token_S[a:b]
            x_nD = torch.index_select(x_TD, 0, tok, out=buf_nD[:n])
            pre_nH = torch.mm(x_nD, w1_EDH[e], out=saved_SH[a:b])
            up_nH = None if up_SH is None else torch.mm(x_nD, w3_EDH[e], out=up_SH[a:b])
            h_nH = activations.code_forward(act, pre_nH, h_SH[a:b], up_nH)
            hw_nH = torch.mul(h_nH, g_S1[a:b], out=buf_nH[:n])
            y_TD.index_add_(0, tok, torch.mm(hw_nH, w2_EHD[e], out=buf_nD[:n]))
        ctx.save_for_backward(x_TD, token_S, gate_S, w1_EDH, w2_EHD, w3_EDH, saved_SH, up_SH)
        ctx.counts, ctx.act, ctx.block_rows = counts, act, block_rows
        ctx.mark_non_differentiable(h_SH)
        ctx.set_materialize_grads(False)  # h_SH has no gradient: skip an (S, H) zero fill
        return y_TD, h_SH

    @staticmethod
    def backward(ctx, g_TD, _g_h):
        x_TD, token_S, gate_S, w1_EDH, w2_EHD, w3_EDH, saved_SH, up_SH = ctx.saved_tensors
        act, counts = ctx.act, ctx.counts
        need_x, _, need_gate, need_w1, need_w2, need_w3 = ctx.needs_input_grad[:6]
        T, D = x_TD.shape
        H = w1_EDH.shape[2]
        if g_TD is None:  # no gradient reached y_TD (grads are not materialised, see forward)
            return (None,) * 9
        g_TD = g_TD.contiguous()
        g_S1 = gate_S.to(x_TD.dtype).unsqueeze(-1)
        n_max = min(ctx.block_rows, max(counts, default=0))
        gy_nD, x_nD = x_TD.new_empty(n_max, D), x_TD.new_empty(n_max, D)
        ghw_nH, hw_nH = x_TD.new_empty(n_max, H), x_TD.new_empty(n_max, H)
        gx_TD = torch.zeros_like(x_TD) if need_x else None
        gw1 = torch.empty_like(w1_EDH) if need_w1 else None
        gw2 = torch.empty_like(w2_EHD) if need_w2 else None
        gw3 = torch.empty_like(w3_EDH) if w3_EDH is not None and need_w3 else None
        ggate_S = torch.empty(token_S.numel(), dtype=x_TD.dtype, device=x_TD.device) if need_gate else None
        for e, n in enumerate(counts):  # an expert with no rows has zero weight gradients
            if n == 0:
                for gw in (gw1, gw2, gw3):
                    if gw is not None:
                        gw[e].zero_()
        for e, a, b, first in _blocks(counts, ctx.block_rows):
            n, tok = b - a, token_S[a:b]
            saved_nH = saved_SH[a:b]
            up_nH = None if up_SH is None else up_SH[a:b]
            h_nH = activations.recompute_code(act, saved_nH, up_nH)
            gy = torch.index_select(g_TD, 0, tok, out=gy_nD[:n])
            ghw = torch.mm(gy, w2_EHD[e].t(), out=ghw_nH[:n])  # d(loss)/d(h * gate)
            if need_gate:
                torch.linalg.vecdot(ghw, h_nH, out=ggate_S[a:b])
            if need_w2:
                hw = torch.mul(h_nH, g_S1[a:b], out=hw_nH[:n])
                _mm_into(gw2[e], hw.t(), gy, first)
            gpre, gup = activations.code_backward(act, ghw.mul_(g_S1[a:b]), saved_nH, up_nH)
            if need_w1 or gw3 is not None:
                xb = torch.index_select(x_TD, 0, tok, out=x_nD[:n])  # gathered again, not saved
                if need_w1:
                    _mm_into(gw1[e], xb.t(), gpre, first)
                if gw3 is not None:
                    _mm_into(gw3[e], xb.t(), gup, first)
            if need_x:
                gx_nD = torch.mm(gpre, w1_EDH[e].t(), out=x_nD[:n])
                if gup is not None:
                    gx_nD.addmm_(gup, w3_EDH[e].t())
                gx_TD.index_add_(0, tok, gx_nD)
        if ggate_S is not None:
            ggate_S = ggate_S.to(gate_S.dtype)
        return gx_TD, None, ggate_S, gw1, gw2, gw3, None, None, None


def _mm_into(out: Tensor, a: Tensor, b: Tensor, first: bool) -> None:
    """out = a @ b for an expert's first block, out += a @ b for the rest."""
    if first:
        torch.mm(a, b, out=out)
    else:
        out.addmm_(a, b)


class ImplChoice:
    """Which :func:`expert_mlp` implementation a MoE layer runs, decided and logged once per
    (gemm_backend, device type, dtype): the triton probe imports modules, so not every forward.

    ``auto`` fuses on CPU (``blocked``); ``fused`` fuses everywhere, on CUDA with the Triton
    kernels (gathers inside the GEMMs) when triton is usable, else ``blocked``; any other
    gemm_backend (a grouped-GEMM backend name) means the unfused path (None).
    """

    def __init__(self):
        self._chosen: dict[tuple[str, str, torch.dtype], str | None] = {}

    def __call__(self, gemm_backend: str, device: torch.device, dtype: torch.dtype) -> str | None:
        key = (gemm_backend, device.type, dtype)
        if key not in self._chosen:
            impl = None
            if gemm_backend == "fused" or (gemm_backend == "auto" and device.type == "cpu"):
                why = BACKENDS["triton"].reason(device, dtype) if device.type == "cuda" else "not on CUDA"
                impl = "triton" if why is None else "blocked"
                log.info("MoE experts: gemm_backend=%s -> fused expert MLP, impl=%s on %s (triton: %s)",
                         gemm_backend, impl, device.type, why or "usable")
            self._chosen[key] = impl
        return self._chosen[key]


FUSED_IMPL = ImplChoice()


def expert_mlp(x_TD: Tensor, token_S: Tensor, gate_S: Tensor, counts_E: Tensor, w1_EDH: Tensor, w2_EHD: Tensor,
               act: str = "relu", *, w3_EDH: Tensor | None = None, impl: str = "blocked",
               block_rows: int = DEFAULT_BLOCK_ROWS) -> tuple[Tensor, Tensor]:
    """Gated expert MLPs over expert-sorted assignments, combined back onto tokens.

    Args:
        x_TD: token activations (T, D).
        token_S: int64 token of each assignment row, rows sorted by expert.
        gate_S: gate weight of each row.
        counts_E: rows per expert (sums to S); read once on the host.
        w1_EDH, w2_EHD: the experts' first and down projections.
        act: a name in :data:`moex.ops.activations.ACTIVATIONS` (``relu``, ``gelu``, ``relu2``,
            ``swiglu``).
        w3_EDH: the up projection of a gated activation (``swiglu``: code = silu(x w1) * (x w3)).
        impl: ``blocked`` (per-expert blocks of torch ops; any device) or ``triton``
            (``moex.ops.triton_gmm.triton_expert_mlp``: gathers fused into the Triton
            GEMMs; CUDA, or CPU under ``TRITON_INTERPRET=1``).
        block_rows: rows per block of the ``blocked`` implementation.

    Returns:
        ``(y_TD, h_SH)``: the combined output (differentiable in x, gates and the
        weights) and the hidden code of every row (no grad; see :func:`moex.ops.activations.hidden_code`).
    """
    _check_gated(act, w1_EDH, w3_EDH)
    if x_TD.dim() != 2 or w1_EDH.dim() != 3 or w2_EHD.dim() != 3:
        raise ValueError(f"expected x (T, D), w1 (E, D, H), w2 (E, H, D); got {tuple(x_TD.shape)}, "
                         f"{tuple(w1_EDH.shape)}, {tuple(w2_EHD.shape)}")
    E, D, H = w1_EDH.shape
    if x_TD.shape[1] != D or w2_EHD.shape != (E, H, D):
        raise ValueError(f"shapes disagree: x {tuple(x_TD.shape)}, w1 {tuple(w1_EDH.shape)}, w2 {tuple(w2_EHD.shape)}")
    if not (x_TD.dtype == w1_EDH.dtype == w2_EHD.dtype):
        raise ValueError(f"dtypes differ: x {x_TD.dtype}, w1 {w1_EDH.dtype}, w2 {w2_EHD.dtype}")
    if counts_E.shape != (E,) or gate_S.shape != token_S.shape:
        raise ValueError(f"counts_E {tuple(counts_E.shape)} must be ({E},) and gate_S {tuple(gate_S.shape)} "
                         f"must match token_S {tuple(token_S.shape)}")
    if block_rows < 1:
        raise ValueError(f"block_rows must be >= 1, got {block_rows}")
    if impl == "triton":  # counts stay on the device: the kernels schedule tiles without a host sync
        why = BACKENDS["triton"].reason(x_TD.device, x_TD.dtype)
        if why is not None:
            raise BackendUnavailable(f"expert_mlp impl 'triton' unavailable: {why}")
        return triton_expert_mlp(x_TD, token_S, gate_S, counts_E, w1_EDH, w2_EHD, act, w3_EDH=w3_EDH)
    if impl != "blocked":
        raise ValueError(f"unknown expert_mlp impl {impl!r}; valid: ['blocked', 'triton']")
    counts = [int(c) for c in counts_E.tolist()]  # the block loop runs on the host
    if sum(counts) != token_S.numel():
        raise ValueError(f"counts_E sums to {sum(counts)} but token_S has {token_S.numel()} rows")
    w3 = None if w3_EDH is None else w3_EDH.contiguous()
    return _ExpertMLP.apply(x_TD.contiguous(), token_S, gate_S, w1_EDH.contiguous(), w2_EHD.contiguous(), w3,
                            counts, act, block_rows)


def _check_gated(act: str, w1_EDH: Tensor, w3_EDH: Tensor | None) -> None:
    gated = activations.get(act).gated
    if gated != (w3_EDH is not None):
        raise ValueError(f"activation {act!r} " + ("needs w3_EDH (gate and up projections)" if gated
                                                    else "takes no w3_EDH (it is not gated)"))
    if gated and (w3_EDH.shape != w1_EDH.shape or w3_EDH.dtype != w1_EDH.dtype):
        raise ValueError(f"w3 {tuple(w3_EDH.shape)} {w3_EDH.dtype} must match w1 {tuple(w1_EDH.shape)} {w1_EDH.dtype}")


def expert_mlp_reference(x_TD: Tensor, token_S: Tensor, gate_S: Tensor, counts_E: Tensor, w1_EDH: Tensor,
                         w2_EHD: Tensor, act: str = "relu", *, w3_EDH: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Plain composition: gather, loop grouped GEMMs, activation, gate, scatter-add."""
    x_SD = x_TD.index_select(0, token_S)
    up_SH = None if w3_EDH is None else grouped_mm_reference(x_SD, w3_EDH, counts_E)
    h_SH = activations.hidden_code(act, grouped_mm_reference(x_SD, w1_EDH, counts_E), up_SH)
    y_SD = grouped_mm_reference(h_SH * gate_S.to(h_SH.dtype).unsqueeze(-1), w2_EHD, counts_E)
    y_TD = y_SD.new_zeros(x_TD.shape).index_add(0, token_S, y_SD)
    return y_TD, h_SH.detach()
