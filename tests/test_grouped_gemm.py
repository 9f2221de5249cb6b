"""grouped_mm backends vs the loop reference, forward and backward; backend errors."""

import logging

import pytest
import torch

from moex.ops import BACKENDS, BackendUnavailable, available_backends, grouped_mm, grouped_mm_reference, resolve_backend

CASES = [  # (counts, K, N)
    ([3, 0, 7], 8, 12),       # an empty expert, uneven groups
    ([1], 4, 4),              # a single token, single expert
    ([0, 5, 0, 2], 6, 10),    # K, N not 16-byte aligned -> padding path
    ([4, 4], 16, 8),
    ([0, 0, 0], 8, 8),        # no rows at all
    ([2, 9, 1, 0, 3], 5, 3),  # odd everything
]


def _check(backend, counts, K, N, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    A, E = sum(counts), len(counts)
    x = torch.randn(A, K, generator=g).to(dtype).requires_grad_()
    w = torch.randn(E, K, N, generator=g).to(dtype).requires_grad_()
    c = torch.tensor(counts)
    y = grouped_mm(x, w, c, backend=backend)
    xr, wr = x.detach().float().requires_grad_(), w.detach().float().requires_grad_()
    yr = grouped_mm_reference(xr, wr, c)
    assert y.shape == (A, N) and y.dtype == dtype
    tol = dict(rtol=3e-2, atol=1e-1) if dtype == torch.bfloat16 else dict(rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(y.float(), yr, **tol)
    gy = torch.randn(A, N, generator=g)
    dx, dw = torch.autograd.grad(y, (x, w), gy.to(dtype))
    dxr, dwr = torch.autograd.grad(yr, (xr, wr), gy)
    torch.testing.assert_close(dx.float(), dxr, **tol)
    torch.testing.assert_close(dw.float(), dwr, **tol)
    if counts.count(0):
        for e in (i for i, n in enumerate(counts) if n == 0):
            assert torch.all(dw[e] == 0)


@pytest.mark.parametrize("backend", ["loop", "torch", "auto"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", CASES)
def test_backend_matches_loop(backend, dtype, case):
    _check(backend, *case, dtype)


def test_loop_is_exact_per_expert():
    x, w = torch.randn(5, 3), torch.randn(2, 3, 4)
    y = grouped_mm(x, w, torch.tensor([2, 3]), backend="loop")
    torch.testing.assert_close(y, torch.cat([x[:2] @ w[0], x[2:] @ w[1]]))


def test_torch_backend_sum_backward_zero_stride_grad():
    # y.sum().backward() hands grouped_mm an expanded zero-stride gradient
    x = torch.randn(10, 8, requires_grad=True)
    w = torch.randn(2, 8, 8, requires_grad=True)
    grouped_mm(x, w, torch.tensor([3, 7]), backend="torch").sum().backward()
    torch.testing.assert_close(x.grad[:3], w.detach()[0].sum(-1).expand(3, 8))


def test_torch_backend_non_contiguous_inputs():
    x = torch.randn(8, 12)[:, ::2].requires_grad_()       # (8, 6), stride 2
    w = torch.randn(3, 5, 6).transpose(1, 2).requires_grad_()  # (3, 6, 5), transposed
    c = torch.tensor([3, 0, 5])
    torch.testing.assert_close(grouped_mm(x, w, c, backend="torch"), grouped_mm_reference(x, w, c))


def test_auto_picks_torch_on_cpu_and_logs_once(caplog):
    assert resolve_backend("auto", "cpu", torch.float32)[0] == "torch"
    assert resolve_backend("auto", "cpu", torch.float64)[0] == "loop"  # torch grouped_mm lacks fp64
    BACKENDS.forget_logged()  # earlier tests may have logged this choice already
    with caplog.at_level(logging.INFO, logger="moex.ops.grouped_gemm"):
        for _ in range(3):
            grouped_mm(torch.randn(2, 4, dtype=torch.float64), torch.randn(1, 4, 4, dtype=torch.float64), torch.tensor([2]))
    msgs = [r.getMessage() for r in caplog.records if "float64" in r.getMessage()]
    assert msgs == ["grouped_mm backend=auto -> loop for cpu torch.float64 (auto on cpu: torch grouped_mm fails for "
                    "torch.float64 on cpu: " + BACKENDS["torch"].reason("cpu", torch.float64).split(": ", 1)[1] + ")"]


def test_backends_are_named_objects():
    for name in BACKENDS:
        b = BACKENDS[name]
        assert b.name == name and b.available("cpu") == (b.reason("cpu") is None)
    assert BACKENDS["loop"].available("cpu", torch.float64) and BACKENDS["torch"].available("cpu", torch.float32)
    x, w, c = torch.randn(5, 4), torch.randn(2, 4, 3), torch.tensor([2, 3])
    torch.testing.assert_close(BACKENDS["torch"].grouped_mm(x, w, c), grouped_mm_reference(x, w, c))


def test_explicit_torch_backend_unsupported_dtype_raises():
    with pytest.raises(BackendUnavailable, match="torch"):
        grouped_mm(torch.randn(2, 4, dtype=torch.float64), torch.randn(1, 4, 4, dtype=torch.float64), torch.tensor([2]), backend="torch")


def test_unknown_backend_lists_valid_names():
    with pytest.raises(ValueError, match=r"valid: \['auto', 'loop', 'torch', 'triton', 'grouped_gemm', 'megablocks'\]"):
        grouped_mm(torch.randn(2, 4), torch.randn(1, 4, 4), torch.tensor([2]), backend="cutlass")


@pytest.mark.parametrize("backend,hint", [("grouped_gemm", r"moex-lm\[gpu\]"), ("megablocks", r"moex-lm\[megablocks\]")])
def test_missing_gpu_extras_raise_clear_error(backend, hint):
    with pytest.raises(BackendUnavailable, match=hint) as e:
        grouped_mm(torch.randn(2, 4), torch.randn(1, 4, 4), torch.tensor([2]), backend=backend)
    reason = available_backends("cpu")[backend]
    assert reason and reason in str(e.value)  # the listing gives the same reason the error does


def test_shape_and_count_validation():
    with pytest.raises(ValueError, match="counts_E"):
        grouped_mm(torch.randn(2, 4), torch.randn(2, 4, 4), torch.tensor([2]), backend="loop")
    with pytest.raises(ValueError, match="sums to"):
        grouped_mm(torch.randn(3, 4), torch.randn(1, 4, 4), torch.tensor([2]), backend="loop")
