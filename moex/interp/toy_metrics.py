"""What a toy model of superposition represents, measured against its known features.

Shape key: N ground-truth features, M bottleneck dims, U code units, E experts,
P sample positions.

- Features represented (arXiv 2510.23671, after Elhage et al.): feature i is
  represented when ||W_i|| > 0.5. In the tied toy model x_hat = ReLU(W^T W x + b),
  ||W_i||^2 is feature i's self-gain, the i-th output for the input e_i before the
  bias. For any layer we take ||W_i|| = sqrt(max(0, ffn(e_i)_i)), which equals the
  weight norm for the tied model. For a MoE, the paper counts per expert:
  ||W_e,i|| from expert e alone (ungated), E_e(e_i)_i.
- Dimensionality (Elhage et al.) of a weight matrix: D_i = ||W_i||^2 / sum_j (W^_i . W_j)^2
  (1 = a dedicated dimension, 1/2 = an antipodal pair).
- Per-unit monosemanticity: the activation mass of unit j due to feature i,
  m_ij = mean over magnitudes t of |c_j(t e_i) - c_j(0)|; per unit, the share of
  its mass carried by its top feature, and its effective number of features
  (participation ratio (sum_i m_ij)^2 / sum_i m_ij^2: 1 for one feature, k for k
  equal ones); both averaged over units weighted by each unit's mass.
- Karvonen-style coverage / reconstruction (moex.interp.bsp) and k-sparse
  probing (moex.interp.ksparse, Gurnee et al. 2023) of the code on sampled
  inputs, with "feature i is present" as the properties.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch
from torch import Tensor

from moex.interp import bsp, ksparse
from moex.interp.toy import ToyModel, ToyTask, unit_code
from moex.models.moe import MoELayer

MAGNITUDES = tuple(round(0.1 * i, 1) for i in range(1, 11))


def feature_norms(W_NM: Tensor) -> Tensor:
    """||W_i||: the norm of each feature's row."""
    return W_NM.norm(dim=-1)


def dimensionality(W_NM: Tensor, eps: float = 1e-12) -> Tensor:
    """D_i = ||W_i||^2 / sum_j (W^_i . W_j)^2 (0 for a zero row)."""
    sq = W_NM.square().sum(-1)
    interference = ((W_NM / sq.clamp_min(eps).sqrt()[:, None]) @ W_NM.T).square().sum(-1)
    return torch.where(sq > eps, sq / interference.clamp_min(eps), torch.zeros_like(sq))


@torch.no_grad()
def self_gain_norms(ffn, n: int) -> Tensor:
    """sqrt(max(0, ffn(e_i)_i)) per feature: ||W_i|| of the layer as a whole (routing included)."""
    return ffn(torch.eye(n)).y.diagonal().clamp_min(0).sqrt()


@torch.no_grad()
def expert_norms(layer: MoELayer) -> Tensor:
    """(E, N): sqrt(max(0, E_e(e_i)_i)) for each expert alone, ungated (the paper's per-expert W_e,i)."""
    E, n = layer.cfg.num_experts, layer.experts.w1_EDH.shape[1]
    x_AD = torch.eye(n).repeat(E, 1)  # every expert sees every e_i
    y_AD, _ = layer.experts(x_AD, torch.full((E,), n, dtype=torch.long), backend="loop")
    return y_AD.view(E, n, n).diagonal(dim1=1, dim2=2).clamp_min(0).sqrt()


@torch.no_grad()
def unit_feature_mass(code_fn: Callable[[Tensor], Tensor], n: int, magnitudes=MAGNITUDES) -> Tensor:
    """(N, U): m_ij = mean_t |c_j(t e_i) - c_j(0)|, unit j's activation mass due to feature i alone."""
    t = torch.tensor(magnitudes, dtype=torch.float32)
    x = (t[:, None, None] * torch.eye(n)).reshape(-1, n)  # (T*N, N)
    codes = code_fn(torch.cat([x, torch.zeros(1, n)]))
    return (codes[:-1] - codes[-1:]).abs().view(len(t), n, -1).mean(0)


def monosemanticity(mass_NU: Tensor, alive_rel: float = 1e-3) -> dict:
    """Mass-weighted mean over alive units of the top feature's share and of the effective features per unit.

    A unit is alive when its total mass exceeds `alive_rel` times the largest unit's.
    """
    m = mass_NU.double()
    tot_U = m.sum(0)
    alive = tot_U > alive_rel * tot_U.max().clamp_min(1e-30)
    if not alive.any():
        return {"top_share": float("nan"), "features_per_unit": float("nan"), "alive_units": 0,
                "units": int(m.shape[1])}
    units = int(m.shape[1])
    m, tot = m[:, alive], tot_U[alive]
    share = m.max(0).values / tot
    eff = tot.square() / m.square().sum(0)
    w = tot / tot.sum()
    return {"top_share": float((w * share).sum()), "features_per_unit": float((w * eff).sum()),
            "alive_units": int(alive.sum()), "units": units}


PROBE_KS = (1, 2, 4)


def known_feature_scores(code_fn: Callable[[Tensor], Tensor], task: ToyTask, *, positions: int = 8000,
                         seed: int = 12345) -> dict:
    """Karvonen coverage (first half) and reconstruction (first half labels, second half scored);
    k-sparse probes fit on the first half, held-out F1 on the second, averaged over probed features."""
    x = task.sample(positions, torch.Generator().manual_seed(seed))
    acts = code_fn(x).numpy().astype(np.float32)
    labels = (x > 0).numpy()
    h = positions // 2
    cov = bsp.coverage(acts[:h], labels[:h])
    rec = bsp.reconstruction(acts[:h], labels[:h], acts[h:], labels[h:])
    probe = ksparse.probe_properties(acts[:h], labels[:h], acts[h:], labels[h:], ks=PROBE_KS)
    out = {"coverage": cov["score"], "coverage_threshold": cov["threshold"], "reconstruction": rec["score"],
           "labelled_features": rec["labelled_features"], "probed_features": int(len(probe["properties"]))}
    for k in PROBE_KS:
        out[f"ksparse_f1_k{k}"] = float(probe["f1"][k].mean()) if len(probe["properties"]) else float("nan")
    return out


@torch.no_grad()
def evaluate(model: ToyModel, task: ToyTask, *, positions: int = 8000, seed: int = 12345) -> dict:
    """Every toy metric of a trained model (eval mode)."""
    model.eval()
    ffn, n = model.ffn, task.n
    x = task.sample(positions, torch.Generator().manual_seed(seed + 1))
    loss = float(task.loss(model(x)[0], x))
    norms = self_gain_norms(ffn, n)
    code_fn = lambda xb: unit_code(ffn, xb)  # noqa: E731
    out = {"loss": loss, "loss_rel": loss / task.zero_loss(), "represented": int((norms > 0.5).sum()),
           "norms": [round(float(v), 4) for v in norms]}
    if isinstance(ffn, MoELayer):
        out["represented_per_expert"] = float((expert_norms(ffn) > 0.5).sum(1).float().mean())
    out.update(monosemanticity(unit_feature_mass(code_fn, n)))
    out.update(known_feature_scores(code_fn, task, positions=positions, seed=seed))
    return out
