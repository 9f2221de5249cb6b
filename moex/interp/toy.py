"""Toy models of superposition (Elhage et al. 2022) built from moex's real FFN layers.

Shape key: B batch, N ground-truth features (= the layer's d_model), U units of a
layer's code, E experts.

Task: x_i ~ U(0, 1) with probability 1 - S, else 0, independently per feature;
importance I_i = decay**i. Model: x_hat = ReLU(ffn(x) + b), where `ffn` is a real
moex layer (DenseMLP, MoELayer, MonetLayer, PEERLayer) with d_model = N whose
*active* hidden width is the bottleneck d < N. This is the toy model's
privileged-basis variant: the bottleneck is the layer's hidden units, so
"features per unit" is well defined. Loss: sum_i I_i mean_b (x_i - x_hat_i)^2
plus the layer's own aux losses (as in arXiv 2510.23671, where each expert is
a toy model behind a top-k router with the Switch balance loss).

Families at equal active expert parameters (2 N d per token):
    dense-relu, dense-gelu  DenseMLP, d hidden units
    switch                  MoELayer, topk router, k=1 of E experts of d units
    moex                    MoELayer, MoE-X router, k=2 of E ReLU experts of d/2 units
    monet                   MonetLayer VD, 1 head, k=2 of E sub-experts of d/2 units
    peer                    PEERLayer, 1 head, k=d of 16^2 single-neuron experts
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moex.config import MoEConfig, MonetConfig, PEERConfig
from moex.models.mlp import DenseMLP
from moex.models.moe import MoELayer
from moex.models.monet import MonetLayer
from moex.models.outputs import SparseCode
from moex.models.peer import PEERLayer

FAMILIES = ("dense-relu", "dense-gelu", "switch", "moex", "monet", "peer")


@dataclass(kw_only=True)
class ToyTask:
    """n sparse ground-truth features, a bottleneck of width d, importance decay**i."""

    n: int = 32
    d: int = 8
    sparsity: float = 0.9  # S: each feature is zero with probability S
    importance_decay: float = 0.9

    def __post_init__(self):
        if not 0.0 <= self.sparsity < 1.0:
            raise ValueError(f"sparsity must be in [0, 1), got {self.sparsity}")
        if not 0 < self.d <= self.n:
            raise ValueError(f"need 0 < d <= n, got d={self.d}, n={self.n}")

    def importance(self) -> Tensor:
        return self.importance_decay ** torch.arange(self.n, dtype=torch.float32)

    def sample(self, batch: int, gen: torch.Generator | None = None) -> Tensor:
        """(batch, n): each entry U(0, 1) with probability 1 - S, else exactly 0."""
        mag = torch.rand(batch, self.n, generator=gen)
        on = torch.rand(batch, self.n, generator=gen) < 1.0 - self.sparsity
        return mag * on

    def loss(self, x_hat: Tensor, x: Tensor) -> Tensor:
        """Importance-weighted MSE: sum_i I_i mean_b (x_i - x_hat_i)^2."""
        return (self.importance().to(x) * (x - x_hat).square().mean(0)).sum()

    def zero_loss(self) -> float:
        """The loss of predicting 0 everywhere: sum_i I_i E[x_i^2] = sum_i I_i (1 - S) / 3."""
        return float(self.importance().sum()) * (1.0 - self.sparsity) / 3.0


def build_ffn(family: str, n: int, d: int, *, experts: int = 8) -> nn.Module:
    """A real moex FFN layer with d_model = n and 2*n*d active expert parameters per token."""
    if family in ("dense-relu", "dense-gelu"):
        return DenseMLP(n, d, family.split("-")[1])
    if family == "switch":
        return MoELayer(n, MoEConfig(num_experts=experts, top_k=1, d_expert=d, router="topk"), std=n**-0.5)
    if family in ("moex", "monet") and d % (4 if family == "monet" else 2):
        raise ValueError(f"{family} splits d over k=2 experts{' and VD halves' if family == 'monet' else ''}: "
                         f"d={d} must be a multiple of {4 if family == 'monet' else 2}")
    if family == "moex":
        return MoELayer(n, MoEConfig(num_experts=experts, top_k=2, d_expert=d // 2, router="moex"), std=n**-0.5)
    if family == "monet":
        return MonetLayer(n, MonetConfig(num_sub_experts=experts, num_heads=1, top_k=2, d_expert=d // 2, mode="vd"))
    if family == "peer":
        return PEERLayer(n, PEERConfig(num_sub_experts=max(16, d), num_heads=1, top_k=d, activation="relu"))
    raise ValueError(f"unknown toy family {family!r}; valid: {', '.join(FAMILIES)}")


class ToyModel(nn.Module):
    """x_hat = ReLU(ffn(x) + b): the toy model's ReLU output layer around a real moex FFN."""

    def __init__(self, ffn: nn.Module, n: int):
        super().__init__()
        self.ffn = ffn
        self.b_final = nn.Parameter(torch.zeros(n))
        for name, p in ffn.named_parameters():  # one scale for every layer family
            if p.dim() >= 2 and "keys" not in name:
                nn.init.normal_(p, 0.0, n**-0.5)

    def forward(self, x_BN: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        out = self.ffn(x_BN)
        return F.relu(out.y + self.b_final), out.aux_losses


def active_params(ffn: nn.Module) -> int:
    """Parameters one token uses: routing/query parameters plus the active share of the experts."""
    if isinstance(ffn, DenseMLP):
        return sum(p.numel() for p in ffn.parameters())
    if isinstance(ffn, MoELayer):
        experts = sum(p.numel() for p in ffn.experts.parameters())
        return sum(p.numel() for p in ffn.router.parameters()) + experts * ffn.cfg.top_k // ffn.cfg.num_experts
    total, active = ffn.active_params()  # Monet, PEER: (expert params, active expert params)
    return sum(p.numel() for p in ffn.parameters()) - total + active


def train(model: ToyModel, task: ToyTask, *, steps: int = 2000, batch: int = 1024, lr: float = 1e-2,
          seed: int = 0) -> list[float]:
    """Adam with cosine decay on fresh batches; returns the reconstruction loss every 100 steps."""
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * s / steps)))
    model.train()
    curve = []
    for step in range(steps):
        x = task.sample(batch, gen)
        x_hat, aux = model(x)
        rec = task.loss(x_hat, x)
        loss = rec + sum(aux.values(), torch.zeros(()))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if step % 100 == 0 or step == steps - 1:
            curve.append(float(rec.detach()))
    model.eval()
    return curve


@torch.no_grad()
def unit_code(ffn: nn.Module, x_BN: Tensor) -> Tensor:
    """(B, U) the layer's hidden units as one wide code, zero where a unit's expert was not selected.

    Dense: post-activation units. MoE: every expert's ReLU units times the expert's
    gate (the code W_dec reads). Monet: each sub-expert's hidden half-layer times its
    summed gate (VD: both key sets' halves side by side). PEER: each of the N^2
    single-neuron experts' activation times its gate (the code `up` reads).
    """
    # the code the layer's own forward computed (moex.interp.features), not a re-derivation
    name = next((n for cls, n in ((DenseMLP, "mlp.post"), (MoELayer, "moe.code"), (MonetLayer, "monet.code"),
                                  (PEERLayer, "peer.code")) if isinstance(ffn, cls)), None)
    if name is not None:
        code = ffn(x_BN, features=True).features[name]
        return code.to_dense(x_BN.shape[0]) if isinstance(code, SparseCode) else code
    raise TypeError(f"no unit code for FFN type {type(ffn).__name__}")
