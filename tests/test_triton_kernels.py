"""Triton grouped GEMM kernels under the interpreter (CPU tensors), vs the loop reference.

TRITON_INTERPRET=1 must be set before triton is first imported (its own jit'd helpers
are decorated then) and stay set while kernels run, so it is set here for the process.
If something imported triton earlier in this pytest process, the tests here are
skipped in favour of one test that reruns this file in a fresh interpreter. Shapes and blocks are tiny: the interpreter runs every program in numpy.
"""

import os
import subprocess
import sys

import pytest

_TRITON_PREIMPORTED = "triton" in sys.modules and os.environ.get("TRITON_INTERPRET") != "1"
os.environ["TRITON_INTERPRET"] = "1"
pytest.importorskip("triton")
import torch  # noqa: E402

from moex.ops import BackendUnavailable, grouped_mm, grouped_mm_reference  # noqa: E402
from moex.ops.triton_gmm import block_sizes, configure, kernel_module, triton_grouped_mm  # noqa: E402

km = kernel_module()
in_process = pytest.mark.skipif(_TRITON_PREIMPORTED, reason="triton imported before TRITON_INTERPRET=1; "
                                "covered by test_rerun_in_fresh_process")

TINY = dict(block_m=16, block_n=16, block_k=16)
CASES = [  # (counts, K, N)
    ([3, 0, 7], 8, 12),      # empty expert, uneven groups
    ([1], 4, 4),             # single token
    ([0, 0], 4, 4),          # no rows
    ([17, 0, 5], 20, 18),    # groups and dims straddling block edges
]


@in_process
def test_kernels_are_interpreted():
    assert km.interpreted(), "kernel module was imported before TRITON_INTERPRET=1 was set"


@in_process
def test_tile_schedule_covers_rows_once():
    counts = torch.tensor([5, 0, 16, 1])
    e_P, row_P, end_P = km.tile_schedule(counts, int(counts.sum()), 4)
    covered = []
    for e, r, end in zip(e_P.tolist(), row_P.tolist(), end_P.tolist()):
        rows = [i for i in range(r, r + 4) if i < end]
        starts = [0, 5, 5, 21]
        assert all(starts[e] <= i < starts[e] + counts[e] for i in rows)
        covered += rows
    assert sorted(covered) == list(range(22))


@in_process
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("case", CASES)
def test_triton_backend_matches_loop(case, dtype):
    counts, K, N = case
    g = torch.Generator().manual_seed(len(counts) + K)
    x = torch.randn(sum(counts), K, generator=g).to(dtype).requires_grad_()
    w = torch.randn(len(counts), K, N, generator=g).to(dtype).requires_grad_()
    c = torch.tensor(counts)
    old = configure(**TINY)
    try:
        y = grouped_mm(x, w, c, backend="triton")
    finally:
        configure(**old)
    xr, wr = x.detach().float().requires_grad_(), w.detach().float().requires_grad_()
    yr = grouped_mm_reference(xr, wr, c)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=3e-2, atol=1e-1)
    assert y.dtype == dtype
    torch.testing.assert_close(y.float(), yr, **tol)
    gy = torch.randn(y.shape, generator=g)
    dx, dw = torch.autograd.grad(y, (x, w), gy.to(dtype))
    dxr, dwr = torch.autograd.grad(yr, (xr, wr), gy)
    torch.testing.assert_close(dx.float(), dxr, **tol)
    torch.testing.assert_close(dw.float(), dwr, **tol)
    for e, n in enumerate(counts):
        if n == 0:
            assert torch.all(dw[e] == 0)


@in_process
def test_strided_inputs_and_expanded_grad():
    x = torch.randn(9, 12)[:, ::2].requires_grad_()            # (9, 6) non-contiguous
    w = torch.randn(2, 5, 6).transpose(1, 2).requires_grad_()  # (2, 6, 5) transposed view
    c = torch.tensor([4, 5])
    y = triton_grouped_mm(x, w, c, block_m=8, block_n=8, block_k=8)
    torch.testing.assert_close(y, grouped_mm_reference(x, w, c))
    y.sum().backward()  # zero-stride upstream grad
    xr, wr = x.detach().requires_grad_(), w.detach().requires_grad_()
    grouped_mm_reference(xr, wr, c).sum().backward()
    torch.testing.assert_close(x.grad, xr.grad)
    torch.testing.assert_close(w.grad, wr.grad)


@in_process
def test_configure_validates_and_restores():
    before = block_sizes()
    with pytest.raises(ValueError, match="power of two"):
        configure(block_m=12)
    old = configure(block_k=8)
    assert block_sizes()["block_k"] == 8
    configure(**old)
    assert block_sizes() == before


@in_process
@pytest.mark.parametrize("case", CASES)
def test_gather_fused_kernels_match_gathered_copies(case):
    """rows= / x_rows= / dy_rows= read operand rows by index == the kernels on index_select'ed copies."""
    counts, K, N = case
    g = torch.Generator().manual_seed(K + N)
    A, T = sum(counts), 6
    c = torch.tensor(counts)
    x_TK = torch.randn(T, K, generator=g)
    rows = torch.randint(0, T, (A,), generator=g)
    w = torch.randn(len(counts), K, N, generator=g)
    dy_TN = torch.randn(T, N, generator=g)
    torch.testing.assert_close(km.gmm_rows(x_TK, w, c, rows=rows, **TINY), grouped_mm_reference(x_TK[rows], w, c))
    x_AK = torch.randn(A, K, generator=g)
    ref = km.gmm_wgrad(x_TK[rows], dy_TN[rows], c, **TINY)
    for e, n in enumerate(counts):  # the un-gathered kernel against a per-expert product first
        s = sum(counts[:e])
        torch.testing.assert_close(ref[e], x_TK[rows][s:s + n].T @ dy_TN[rows][s:s + n], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(km.gmm_wgrad(x_TK, dy_TN, c, x_rows=rows, dy_rows=rows, **TINY), ref)
    torch.testing.assert_close(km.gmm_wgrad(x_AK, dy_TN, c, dy_rows=rows, **TINY),
                               km.gmm_wgrad(x_AK, dy_TN[rows], c, **TINY))


@in_process
@pytest.mark.parametrize("case", CASES)
def test_swiglu_kernel_matches_reference(case):
    """gmm_swiglu_rows == two gathered grouped GEMMs and silu(pre) * up by hand."""
    counts, K, N = case
    g = torch.Generator().manual_seed(K * N)
    A, T, c = sum(counts), 6, torch.tensor(counts)
    x_TK = torch.randn(T, K, generator=g)
    rows = torch.randint(0, T, (A,), generator=g)
    w1, w3 = (torch.randn(len(counts), K, N, generator=g) for _ in range(2))
    pre, up, h = km.gmm_swiglu_rows(x_TK, w1, w3, c, rows=rows, **TINY)
    pre_r, up_r = grouped_mm_reference(x_TK[rows], w1, c), grouped_mm_reference(x_TK[rows], w3, c)
    torch.testing.assert_close(pre, pre_r, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(up, up_r, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(h, pre_r / (1 + torch.exp(-pre_r)) * up_r, rtol=1e-5, atol=1e-5)
    no_gather = km.gmm_swiglu_rows(x_TK[rows], w1, w3, c, **TINY)
    for a, b in zip(no_gather, (pre, up, h)):
        torch.testing.assert_close(a, b)


@in_process
@pytest.mark.parametrize("act", ["relu", "gelu", "relu2", "swiglu"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("counts", [[5, 0, 9, 2], [1], [0, 0]])
def test_triton_expert_mlp_matches_reference(counts, dtype, act):
    from moex.ops import expert_mlp, expert_mlp_reference

    g = torch.Generator().manual_seed(sum(counts))
    E, D, H, T, S = len(counts), 12, 20, 7, sum(counts)
    x = torch.randn(T, D, generator=g).to(dtype).requires_grad_()
    tok = torch.randint(0, T, (S,), generator=g)
    gate = torch.rand(S, generator=g).to(dtype).requires_grad_()
    w1 = torch.randn(E, D, H, generator=g).to(dtype).requires_grad_()
    w2 = torch.randn(E, H, D, generator=g).to(dtype).requires_grad_()
    w3 = torch.randn(E, D, H, generator=g).to(dtype).requires_grad_() if act == "swiglu" else None
    ins = [t for t in (x, gate, w1, w2, w3) if t is not None]
    c = torch.tensor(counts)
    old = configure(**TINY)
    try:
        y, h = expert_mlp(x, tok, gate, c, w1, w2, act, w3_EDH=w3, impl="triton")
        gy = torch.randn(T, D, generator=g)
        grads = torch.autograd.grad(y, ins, gy.to(dtype))
    finally:
        configure(**old)
    up = [t.detach().float().requires_grad_() for t in ins]
    yr, hr = expert_mlp_reference(up[0], tok, up[1], c, up[2], up[3], act, w3_EDH=up[4] if w3 is not None else None)
    refs = torch.autograd.grad(yr, up, gy)
    for a, b in zip((y, h, *grads), (yr, hr, *refs)):
        assert a.dtype == dtype
        scale = float(b.detach().abs().max()) if b.numel() else 1.0  # bf16: relative to the magnitude
        tol = dict(rtol=1e-4, atol=1e-4 * max(1.0, scale)) if dtype == torch.float32 else dict(rtol=5e-2, atol=2e-2 * scale)
        torch.testing.assert_close(a.float(), b, **tol)


def _env_without_interpret():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([os.path.dirname(os.path.dirname(os.path.abspath(__file__))), env.get("PYTHONPATH", "")])
    return env


@pytest.mark.skipif(not _TRITON_PREIMPORTED, reason="triton was not pre-imported: the tests ran in this process")
def test_rerun_in_fresh_process():
    out = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__],
                         capture_output=True, text=True, env=_env_without_interpret(), timeout=600)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-2000:]


@pytest.mark.slow
def test_triton_on_cpu_without_interpreter_raises():
    code = (
        "import os, torch; os.environ.pop('TRITON_INTERPRET', None)\n"
        "from moex.ops import grouped_mm, BackendUnavailable\n"
        "try:\n"
        "    grouped_mm(torch.randn(2, 4), torch.randn(1, 4, 4), torch.tensor([2]), backend='triton')\n"
        "except BackendUnavailable as e:\n"
        "    print('RAISED', e)\n"
        "from moex.ops import expert_mlp\n"
        "try:\n"
        "    expert_mlp(torch.randn(2, 4), torch.tensor([0, 1]), torch.ones(2), torch.tensor([2]),\n"
        "               torch.randn(1, 4, 3), torch.randn(1, 3, 4), impl='triton')\n"
        "except BackendUnavailable as e:\n"
        "    print('MLP RAISED', e)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=_env_without_interpret(),
                         timeout=120)
    assert "RAISED" in out.stdout and "TRITON_INTERPRET=1" in out.stdout, out.stdout + out.stderr
    assert "MLP RAISED expert_mlp impl 'triton' unavailable" in out.stdout, out.stdout + out.stderr


@in_process
def test_triton_rejects_float64():
    with pytest.raises(BackendUnavailable, match="fp32/fp16/bf16"):
        grouped_mm(torch.randn(2, 4, dtype=torch.float64), torch.randn(1, 4, 4, dtype=torch.float64),
                   torch.tensor([2]), backend="triton")
