"""The value every FFN layer (dense or sparse) returns.

Aux losses and routing statistics travel as return values so nothing about a
forward pass hides in module state.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import Tensor


@dataclass
class FFNOutput:
    y: Tensor  # same shape as the input
    aux_losses: dict[str, Tensor] = field(default_factory=dict)  # scaled, summed into the loss
    # Detached statistics. Sparse layers fill: tokens_per_expert (E,), router_entropy,
    # dropped_frac, active_frac (active hidden units per token / all hidden units).
    stats: dict[str, Tensor] = field(default_factory=dict)


def router_entropy(p: Tensor) -> Tensor:
    """Mean over leading dims of the entropy -sum p log p of distributions along the last dim
    (the ``router_entropy`` statistic of every sparse layer; 0 log 0 = 0)."""
    return -(p * p.clamp_min(1e-12).log()).sum(-1).mean()
