"""Grouped GEMM over expert-sorted rows, with selectable backends.

Shape key (docs/architecture.md): A assignment rows (sorted by expert), E experts,
I in-features, J out-features.

``grouped_mm(x_AI, w_EIJ, counts_E)`` computes ``y[a] = x[a] @ w[expert(a)]`` where
the first ``counts_E[0]`` rows belong to expert 0, the next ``counts_E[1]`` to
expert 1, and so on. Every backend is differentiable in ``x`` and ``w``.

Backends are :class:`Backend` objects in one :class:`Registry`, ``BACKENDS``
(``BACKENDS["torch"].available(device, dtype)``, ``.reason(device, dtype)``,
``.grouped_mm(x, w, counts)``; see also :func:`available_backends`):

- ``loop``: a per-expert slice and ``@`` in plain PyTorch; the reference.
- ``torch``: ``torch.nn.functional.grouped_mm`` / ``torch._grouped_mm`` (CPU and
  CUDA). I and J are zero-padded to its 16-byte stride rule; the upstream gradient
  is made contiguous before its backward (it rejects zero-stride grads).
- ``triton``: the Triton kernels in ``moex.kernels.grouped_gemm`` (CUDA, or CPU
  tensors under ``TRITON_INTERPRET=1``).
- ``grouped_gemm``: ``grouped_gemm.ops.gmm`` (CUDA only; ``pip install 'moex-lm[gpu]'``).
- ``megablocks``: megablocks' grouped GEMM (CUDA only; ``pip install 'moex-lm[megablocks]'``,
  which pins torch 2.7.0).
- ``auto``: CPU -> ``torch`` when it runs for this dtype, else ``loop``; CUDA ->
  ``grouped_gemm`` > ``torch`` > ``triton`` > ``loop`` by availability. The choice and
  the reason are logged once.

An explicitly requested backend that cannot run raises :class:`BackendUnavailable`
with the reason; only ``auto`` ever falls back.
"""

from __future__ import annotations

import abc
import logging
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from moex.ops.triton_gmm import kernel_module, triton_grouped_mm

__all__ = ["grouped_mm", "grouped_mm_reference", "resolve_backend", "available_backends", "BackendUnavailable",
           "BACKENDS", "Backend", "Registry"]

log = logging.getLogger(__name__)


class BackendUnavailable(RuntimeError):
    """A grouped-GEMM backend was requested that cannot run here (the message says why)."""


# ----------------------------------------------------------------------------- loop
def grouped_mm_reference(x_AI: Tensor, w_EIJ: Tensor, counts_E: Tensor) -> Tensor:
    """Plain PyTorch reference: slice the rows of each expert and multiply by its weight."""
    sizes = [int(c) for c in counts_E.tolist()]
    if sum(sizes) != x_AI.shape[0]:
        raise ValueError(f"counts_E sums to {sum(sizes)} but x has {x_AI.shape[0]} rows")
    parts = [x_e @ w_EIJ[e] for e, x_e in enumerate(torch.split(x_AI, sizes)) if sizes[e] > 0]
    if not parts:  # no rows: a (0, I) @ (I, J) product keeps x and w in the graph (zero grads)
        return x_AI @ w_EIJ[0]
    return torch.cat(parts)


# ----------------------------------------------------------------------------- backends
class Backend(abc.ABC):
    """A named grouped-GEMM implementation.

    ``reason(device, dtype)`` is why it cannot run there (None when it can; cached per
    device and dtype on the object), ``available(device, dtype)`` is ``reason(...) is None``
    and ``grouped_mm(x_AI, w_EIJ, counts_E)`` runs it (differentiable in x and w).
    """

    name = ""

    def __init__(self):
        self._reasons: dict[tuple[str, torch.dtype], str | None] = {}

    def reason(self, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> str | None:
        key = (str(torch.device(device)), dtype)
        if key not in self._reasons:
            self._reasons[key] = self._why_not(torch.device(device), dtype)
        return self._reasons[key]

    def available(self, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> bool:
        return self.reason(device, dtype) is None

    def clear(self) -> None:
        """Forget cached availability (e.g. after installing a package)."""
        self._reasons.clear()

    def _why_not(self, device: torch.device, dtype: torch.dtype) -> str | None:
        return None

    @abc.abstractmethod
    def grouped_mm(self, x_AI: Tensor, w_EIJ: Tensor, counts_E: Tensor) -> Tensor:
        """``y_AJ[a] = x_AI[a] @ w_EIJ[e(a)]`` (inputs already validated by :func:`grouped_mm`)."""

    def __repr__(self) -> str:
        return f"<grouped_mm backend {self.name!r}>"


class LoopBackend(Backend):
    """Per-expert slices and ``@`` in plain PyTorch: the reference, runs everywhere."""

    name = "loop"

    def grouped_mm(self, x_AI: Tensor, w_EIJ: Tensor, counts_E: Tensor) -> Tensor:
        return grouped_mm_reference(x_AI, w_EIJ, counts_E)


_TORCH_GMM: Callable | None = getattr(F, "grouped_mm", None) or getattr(torch, "_grouped_mm", None)


class _ContiguousGrad(torch.autograd.Function):
    """Identity whose backward materialises the upstream gradient (grouped_mm rejects zero strides)."""

    @staticmethod
    def forward(ctx, y):
        return y.view_as(y)

    @staticmethod
    def backward(ctx, g):
        return g.contiguous()


def _pad_to(n: int, mult: int) -> int:
    return (n + mult - 1) // mult * mult


class TorchBackend(Backend):
    """``torch.nn.functional.grouped_mm`` / ``torch._grouped_mm``; usability is probed once per device/dtype."""

    name = "torch"

    def _why_not(self, device: torch.device, dtype: torch.dtype) -> str | None:
        if _TORCH_GMM is None:
            return f"torch {torch.__version__} has neither torch.nn.functional.grouped_mm nor torch._grouped_mm"
        try:
            with torch.inference_mode(False), torch.enable_grad():  # callers may be under no_grad
                ok = self._probe(device, dtype)
        except Exception as e:  # noqa: BLE001 - any failure means "not usable here"
            return f"torch grouped_mm fails for {dtype} on {device}: {str(e).splitlines()[0]}"
        return None if ok else "torch grouped_mm probe returned wrong values"

    def _probe(self, device: torch.device, dtype: torch.dtype) -> bool:
        x = torch.ones(16, 16, device=device, dtype=dtype, requires_grad=True)
        w = torch.ones(2, 16, 16, device=device, dtype=dtype, requires_grad=True)
        offs = torch.tensor([8, 16], device=device, dtype=torch.int32)
        y = _TORCH_GMM(x, w, offs=offs)
        y.backward(torch.ones_like(y))
        return bool(torch.all(y == 16)) and bool(torch.all(w.grad == 8))

    def grouped_mm(self, x_AI: Tensor, w_EIJ: Tensor, counts_E: Tensor) -> Tensor:
        I, J = w_EIJ.shape[1], w_EIJ.shape[2]
        mult = max(1, 16 // x_AI.element_size())  # 16-byte leading strides
        Ip, Jp = _pad_to(I, mult), _pad_to(J, mult)
        x = F.pad(x_AI, (0, Ip - I)) if Ip != I else x_AI.contiguous()
        w = F.pad(w_EIJ, (0, Jp - J, 0, Ip - I)) if (Ip, Jp) != (I, J) else w_EIJ.contiguous()
        if x.data_ptr() % 16:
            x = x.clone()
        if w.data_ptr() % 16:
            w = w.clone()
        offs_E = torch.cumsum(counts_E.to(device=x.device), 0, dtype=torch.int32)
        y_AJ = _ContiguousGrad.apply(_TORCH_GMM(x, w, offs=offs_E))
        return y_AJ[:, :J] if Jp != J else y_AJ


class TritonBackend(Backend):
    """moex's Triton kernels (``moex.ops.triton_gmm``): CUDA, or CPU tensors under ``TRITON_INTERPRET=1``.

    Not cached: whether the kernels are interpreted depends on when triton was first imported.
    """

    name = "triton"

    def reason(self, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> str | None:
        device = torch.device(device)
        try:
            km = kernel_module()  # imports triton (which fixes interpreter mode from TRITON_INTERPRET)
        except ImportError as e:
            return f"triton is not importable ({e}); pip install 'moex-lm[gpu]'"
        if device.type != "cuda" and not km.interpreted():
            return (f"triton needs CUDA tensors (got {device.type}); for CPU tensors set TRITON_INTERPRET=1 "
                    "before triton is first imported")
        if dtype not in (torch.float32, torch.float16, torch.bfloat16):
            return f"triton grouped GEMM supports fp32/fp16/bf16, not {dtype}"
        return None

    def grouped_mm(self, x_AI: Tensor, w_EIJ: Tensor, counts_E: Tensor) -> Tensor:
        return triton_grouped_mm(x_AI, w_EIJ, counts_E)


class GroupedGemmBackend(Backend):
    """``grouped_gemm.ops.gmm`` (CUDA only; ``pip install 'moex-lm[gpu]'``)."""

    name = "grouped_gemm"

    def _why_not(self, device: torch.device, dtype: torch.dtype) -> str | None:
        try:
            import grouped_gemm.ops  # noqa: F401
        except ImportError as e:
            return f"package 'grouped_gemm' is not installed ({e}); pip install 'moex-lm[gpu]' on a CUDA machine"
        if device.type != "cuda":
            return f"grouped_gemm needs CUDA tensors (got {device.type})"
        return None

    def grouped_mm(self, x_AI: Tensor, w_EIJ: Tensor, counts_E: Tensor) -> Tensor:
        import grouped_gemm.ops as gg

        # batch_sizes must be a CPU int64 tensor; its GroupedGemm Function is differentiable.
        return gg.gmm(x_AI.contiguous(), w_EIJ.contiguous(), counts_E.to("cpu", torch.int64), trans_b=False)


class MegablocksBackend(Backend):
    """megablocks' grouped GEMM (CUDA only; ``pip install 'moex-lm[megablocks]'``, which pins torch 2.7.0)."""

    name = "megablocks"

    @staticmethod
    def _gmm() -> Callable:
        from megablocks import grouped_gemm_util as gu

        if getattr(gu, "grouped_gemm_is_available", lambda: False)():
            return gu.ops.gmm
        from megablocks.backend import kernels  # newer megablocks ship their own gmm

        return kernels.gmm

    def _why_not(self, device: torch.device, dtype: torch.dtype) -> str | None:
        try:
            self._gmm()
        except (ImportError, AttributeError) as e:
            return (f"megablocks grouped GEMM is not available ({e}); pip install 'moex-lm[megablocks]' "
                    "(megablocks 0.10 pins torch 2.7.0 and needs CUDA)")
        if device.type != "cuda":
            return f"megablocks needs CUDA tensors (got {device.type})"
        return None

    def grouped_mm(self, x_AI: Tensor, w_EIJ: Tensor, counts_E: Tensor) -> Tensor:
        return self._gmm()(x_AI.contiguous(), w_EIJ.contiguous(), counts_E.to("cpu", torch.int64), False)


# ----------------------------------------------------------------------------- registry
class Registry:
    """The backends by name, the ``auto`` choice, and which choices were already logged."""

    CUDA_PREFERENCE = ("grouped_gemm", "torch", "triton", "loop")

    def __init__(self, *backends: Backend):
        self._by_name = {b.name: b for b in backends}
        self._logged: set[tuple] = set()

    def __getitem__(self, name: str) -> Backend:
        if name not in self._by_name:
            raise ValueError(f"unknown grouped_mm backend {name!r}; valid: {['auto', *self._by_name]}")
        return self._by_name[name]

    def __iter__(self):
        return iter(self._by_name)

    def __contains__(self, name: object) -> bool:
        return name in self._by_name

    def resolve(self, backend: str, device: torch.device | str, dtype: torch.dtype) -> tuple[Backend, str]:
        """The concrete backend for a requested name (or ``auto``) and the reason for the choice.

        Raises ValueError for an unknown name and BackendUnavailable when an explicitly
        named backend cannot run for this device/dtype.
        """
        device = torch.device(device)
        if backend == "auto":
            if device.type == "cuda":
                order = self.CUDA_PREFERENCE
                for i, name in enumerate(order):
                    if self[name].available(device, dtype):
                        skipped = {n: self[n].reason(device, dtype) for n in order[:i]}
                        return self[name], f"auto on cuda: first available of {order}; skipped {skipped}"
            why = self["torch"].reason(device, dtype)
            if why is None:
                return self["torch"], f"auto on {device.type}: torch grouped_mm works for {dtype}"
            return self["loop"], f"auto on {device.type}: {why}"
        chosen = self[backend]
        why = chosen.reason(device, dtype)
        if why is not None:
            raise BackendUnavailable(f"grouped_mm backend {backend!r} unavailable: {why}")
        return chosen, "requested explicitly"

    def log_once(self, backend: str, chosen: Backend, device: torch.device, dtype: torch.dtype, reason: str) -> bool:
        """Log a resolution the first time this (request, choice, device type, dtype) is seen."""
        key = (backend, chosen.name, device.type, dtype)
        if key in self._logged:
            return False
        self._logged.add(key)
        log.info("grouped_mm backend=%s -> %s for %s %s (%s)", backend, chosen.name, device.type, dtype, reason)
        return True

    def forget_logged(self) -> None:
        self._logged.clear()


BACKENDS = Registry(LoopBackend(), TorchBackend(), TritonBackend(), GroupedGemmBackend(), MegablocksBackend())


def available_backends(device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> dict[str, str | None]:
    """Every backend name mapped to None (usable for this device/dtype) or the reason it is not."""
    return {name: BACKENDS[name].reason(device, dtype) for name in BACKENDS}


def resolve_backend(backend: str, device: torch.device | str, dtype: torch.dtype) -> tuple[str, str]:
    """Map a requested backend (or ``auto``) to a concrete backend name. Returns (name, reason)."""
    chosen, reason = BACKENDS.resolve(backend, device, dtype)
    return chosen.name, reason


def grouped_mm(x_AI: Tensor, w_EIJ: Tensor, counts_E: Tensor, *, backend: str = "auto") -> Tensor:
    """Grouped matmul: ``y_AJ[a] = x_AI[a] @ w_EIJ[e(a)]`` for rows grouped by expert.

    Args:
        x_AI: rows sorted by expert (e.g. by :func:`moex.ops.sort_by_expert`).
        w_EIJ: one (I, J) weight per expert; same dtype as ``x_AI``.
        counts_E: integer rows per expert; must sum to A. Any device.
        backend: ``auto`` | ``loop`` | ``torch`` | ``triton`` | ``grouped_gemm`` | ``megablocks``.

    Returns:
        y_AJ, differentiable in ``x_AI`` and ``w_EIJ``.
    """
    if x_AI.dim() != 2 or w_EIJ.dim() != 3 or x_AI.shape[1] != w_EIJ.shape[1]:
        raise ValueError(f"expected x (A, I) and w (E, I, J), got {tuple(x_AI.shape)} and {tuple(w_EIJ.shape)}")
    if counts_E.shape != (w_EIJ.shape[0],):
        raise ValueError(f"counts_E must have shape ({w_EIJ.shape[0]},), got {tuple(counts_E.shape)}")
    if x_AI.dtype != w_EIJ.dtype:
        raise ValueError(f"x and w dtypes differ: {x_AI.dtype} vs {w_EIJ.dtype}")
    if counts_E.device.type == "cpu" and int(counts_E.sum()) != x_AI.shape[0]:  # free check; no device sync
        raise ValueError(f"counts_E sums to {int(counts_E.sum())} but x has {x_AI.shape[0]} rows")
    chosen, reason = BACKENDS.resolve(backend, x_AI.device, x_AI.dtype)
    BACKENDS.log_once(backend, chosen, x_AI.device, x_AI.dtype, reason)
    return chosen.grouped_mm(x_AI, w_EIJ, counts_E)
