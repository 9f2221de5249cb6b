"""The activation table: every dense-MLP and expert activation, and the hidden code they define.

Shape key: n rows, H hidden units.

A two-matrix MLP's hidden code is ``h = f(x @ w1)``; a gated one (SwiGLU, as in
Llama, Mixtral, Qwen-MoE, OLMoE, DeepSeek) has a third matrix and
``h = silu(x @ w1) * (x @ w3)``. Either way ``y = h @ w2``, so ``h`` is the code an
interpretability study reads (for SwiGLU: the gated hidden units).
:func:`hidden_code` is the one function every path uses to compute it (the MoE
layer's unfused path, the dense MLP, the feature sources); the fused kernels use
the same table's forward/backward pieces.

This module imports only torch: it is a leaf every layer and op can import.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["Activation", "ACTIVATIONS", "get", "hidden_code", "relu2", "code_forward", "code_backward", "recompute_code"]


def relu2(x: Tensor) -> Tensor:
    """Squared ReLU (Primer; Monet's experts)."""
    return F.relu(x).square()


def _relu_grad(g: Tensor, pre: Tensor) -> Tensor:
    # threshold_backward reads only the sign, so ``pre`` may also be ReLU's output
    return torch.ops.aten.threshold_backward(g, pre, 0)


def _relu2_grad(g: Tensor, pre: Tensor) -> Tensor:
    return g * (2 * F.relu(pre))


@dataclass(frozen=True)
class Activation:
    """One activation: ``fn(pre)`` elementwise, ``grad(g, pre) = g * fn'(pre)``.

    ``gated`` activations multiply ``fn(x @ w1)`` by a second projection ``x @ w3``.
    """

    name: str
    fn: Callable[[Tensor], Tensor]
    grad: Callable[[Tensor, Tensor], Tensor]
    gated: bool = False


ACTIVATIONS: dict[str, Activation] = {
    "relu": Activation("relu", F.relu, _relu_grad),
    "gelu": Activation("gelu", F.gelu, lambda g, pre: torch.ops.aten.gelu_backward(g, pre)),
    # GPT-2's "gelu_new" (tanh approximation); the dense MLP of imported GPT-2 models
    "gelu_tanh": Activation("gelu_tanh", lambda x: F.gelu(x, approximate="tanh"),
                            lambda g, pre: torch.ops.aten.gelu_backward(g, pre, approximate="tanh")),
    "relu2": Activation("relu2", relu2, _relu2_grad),
    "swiglu": Activation("swiglu", F.silu, lambda g, pre: torch.ops.aten.silu_backward(g, pre), gated=True),
}


def get(name: str) -> Activation:
    """The table entry for ``name``; a clear error listing the valid names otherwise."""
    if name not in ACTIVATIONS:
        raise ValueError(f"unknown activation {name!r}; valid: {sorted(ACTIVATIONS)}")
    return ACTIVATIONS[name]


def hidden_code(name: str, pre_nH: Tensor, up_nH: Tensor | None = None) -> Tensor:
    """The hidden code from the first projection ``pre = x @ w1`` (and ``up = x @ w3`` when gated).

    relu/gelu/relu2: ``f(pre)``; swiglu: ``silu(pre) * up``. Differentiable.
    """
    act = get(name)
    if act.gated:
        if up_nH is None:
            raise ValueError(f"activation {name!r} is gated: it needs the up projection x @ w3")
        return act.fn(pre_nH) * up_nH
    return act.fn(pre_nH)


# ----------------------------------------------------------------------------- fused-op pieces
def code_forward(act: str, pre: Tensor, out: Tensor | None = None, up: Tensor | None = None) -> Tensor:
    """The hidden code from ``pre = x @ w1`` (and ``up = x @ w3`` when gated), written into ``out``
    if given. ReLU runs in place on ``pre`` (threshold writes +0.0 for -0.0 too, which
    ``moex.ops.expert_mlp.count_active`` relies on)."""
    if act == "relu":
        return F.threshold_(pre, 0.0, 0.0)
    h = hidden_code(act, pre, up)
    return h if out is None else out.copy_(h)


def code_backward(act: str, g_nH: Tensor, saved_nH: Tensor, up_nH: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
    """Gradients (d pre, d up) from d(code) ``g_nH``; ``saved_nH`` is ReLU's output or the
    pre-activation. ``g_nH`` may be overwritten."""
    if act == "relu":  # in place into g_nH: zero where the unit was off
        return torch.ops.aten.threshold_backward.grad_input(g_nH, saved_nH, 0, grad_input=g_nH), None
    a = get(act)
    if not a.gated:
        return a.grad(g_nH, saved_nH), None
    g_up = g_nH * a.fn(saved_nH)
    return a.grad(g_nH.mul_(up_nH), saved_nH), g_up


def recompute_code(act: str, saved_nH: Tensor, up_nH: Tensor | None) -> Tensor:
    """The code recomputed from what a fused forward saved (ReLU saved the code itself)."""
    return saved_nH if act == "relu" else hidden_code(act, saved_nH, up_nH)
