"""Dense MLP baseline (ReLU, GELU, squared ReLU or SwiGLU); its hidden units are a feature source."""

from __future__ import annotations

from torch import Tensor, nn

from moex.models.outputs import FFNOutput
from moex.ops import activations


def activation(name: str):
    """The elementwise function of a two-matrix activation (see :mod:`moex.ops.activations`)."""
    a = activations.get(name)
    if a.gated:
        raise ValueError(f"activation {name!r} is gated (three matrices); this layer supports only "
                         f"{sorted(n for n, v in activations.ACTIVATIONS.items() if not v.gated)}")
    return a.fn


class DenseMLP(nn.Module):
    """``y = proj(code(x))`` with ``code = act(fc x)``, or ``silu(fc x) * up(x)`` for SwiGLU."""

    FEATURE_SOURCES = ("mlp.pre", "mlp.post")  # what forward(x, features=True) returns

    def __init__(self, d_model: int, d_ff: int, act: str = "gelu", *, bias: bool = False):
        super().__init__()
        self.fc = nn.Linear(d_model, d_ff, bias=bias)
        self.up = nn.Linear(d_model, d_ff, bias=bias) if activations.get(act).gated else None
        self.proj = nn.Linear(d_ff, d_model, bias=bias)
        self.act_name, self.act = act, activations.get(act).fn

    def hidden(self, x: Tensor) -> Tensor:
        """The hidden code (the dense model's features; SwiGLU: the gated units)."""
        return activations.hidden_code(self.act_name, self.fc(x), None if self.up is None else self.up(x))

    def forward(self, x: Tensor, *, features: bool = False) -> FFNOutput:
        """With ``features``: also ``mlp.pre`` (fc x, before the activation) and ``mlp.post`` (the hidden code)."""
        pre = self.fc(x)
        h = activations.hidden_code(self.act_name, pre, None if self.up is None else self.up(x))  # = hidden(x)
        feats = {}
        if features:
            feats = {"mlp.pre": pre.detach().reshape(-1, pre.shape[-1]), "mlp.post": h.detach().reshape(-1, h.shape[-1])}
        return FFNOutput(self.proj(h), stats={"active_frac": (h > 0).float().mean().detach()}, features=feats)
