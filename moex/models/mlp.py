"""Dense MLP baseline (GELU or ReLU); its hidden units are a feature source."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from moex.models.outputs import FFNOutput

ACTIVATIONS = {"relu": F.relu, "gelu": F.gelu}


def activation(name: str):
    if name not in ACTIVATIONS:
        raise ValueError(f"unknown activation {name!r}; valid: {sorted(ACTIVATIONS)}")
    return ACTIVATIONS[name]


class DenseMLP(nn.Module):
    def __init__(self, d_model: int, d_ff: int, act: str = "gelu", *, bias: bool = False):
        super().__init__()
        self.fc = nn.Linear(d_model, d_ff, bias=bias)
        self.proj = nn.Linear(d_ff, d_model, bias=bias)
        self.act_name, self.act = act, activation(act)

    def hidden(self, x: Tensor) -> Tensor:
        """Post-activation hidden units (the dense model's features)."""
        return self.act(self.fc(x))

    def forward(self, x: Tensor) -> FFNOutput:
        h = self.hidden(x)
        return FFNOutput(self.proj(h), stats={"active_frac": (h > 0).float().mean().detach()})
