"""Monet: Mixture of Monosemantic Experts (Park et al. 2024, arXiv 2412.04139).

Shape key (docs/architecture.md): T tokens, D model dim, G routing heads (h indexes
them), N sub-experts per key set (`num_sub_experts`; N*N experts), M hidden units per
sub-expert (`d_expert`), M2 = M/2 (VD half-layers), D2 = D/2. Config: `model.monet` (moex.config.MonetConfig).

Two routers score N sub-experts each, per head. Logits z are normalised by a
BatchNorm without affine (one mean/var per head, pooled over tokens and
sub-experts, as in the official code; running stats at eval); sub-expert i is
kept when its normalised logit >= Phi^-1(1 - k/N), the max always kept;
g = softmax of the raw logits over the kept set. Expert (i, j) gets weight
sum_h g1_hi g2_hj. Activation: squared ReLU.

Horizontal decomposition (HD), E_ij(x) = V_j a(U_i x + b1_i) + b2_j:
    sum_h sum_ij g1_hi g2_hj E_ij(x)
      = sum_j V_j [ sum_h g2_hj sum_i g1_hi a(U_i x + b1_i) ] + sum_h sum_j g2_hj b2_j
(sum_i g1_hi = 1), so no N^2 expert is ever built.

Vertical decomposition (VD): sub-expert i owns half-layer h1_i = a(U1_i x + b11_i)
(M2 units) and the top output half, j owns h2_j and the bottom half:
    E_ij(x) = [ V11_i h1_i + V12_i h2_j + b1_i ;  V21_j h1_i + V22_j h2_j + b2_j ]
This is the official code's MoVDE read as a per-expert formula.

Router sharing: one `MonetRouter` module serves `router_share_every`
consecutive sparse layers, each applying it to its own input. (The official
code instead reuses the *gates* computed at the group's first layer; that needs
state passed between layers, which the block interface here does not carry.)

Aux losses (`uniformity_coef`, `ambiguity_coef`; 1e-3 each by default): uniformity N * sum_i (mean_t g_i - 1/N)^2
(0 when usage is uniform) and ambiguity mean(1 - max_i g_i), both averaged over
heads and the two routers. The paper states them in words and a formula whose
normalisation we do not reproduce exactly; these have the same minimisers.
"""

from __future__ import annotations

from statistics import NormalDist

import torch
from torch import Tensor, nn

from moex.config import ModelConfig, MonetConfig
from moex.models.outputs import FFNOutput, SparseCode, router_entropy
from moex.ops.activations import relu2


class MonetRouter(nn.Module):
    """Two product-key routers: x_TD -> (g1_TGN, g2_TGN, z1_TGN, z2_TGN, keep1_TGN, keep2_TGN)."""

    def __init__(self, d_model: int, num_sub: int, num_heads: int, top_k: int):
        super().__init__()
        if not 1 <= top_k < num_sub:
            raise ValueError(f"Monet needs 1 <= top_k < num_sub_experts, got top_k={top_k}, N={num_sub}")
        self.N, self.G = num_sub, num_heads
        self.w1 = nn.Linear(d_model, num_heads * num_sub, bias=False)
        self.w2 = nn.Linear(d_model, num_heads * num_sub, bias=False)
        self.norm1 = nn.BatchNorm1d(num_heads, affine=False)
        self.norm2 = nn.BatchNorm1d(num_heads, affine=False)
        self.threshold = NormalDist().inv_cdf(1 - top_k / num_sub)

    def _gates(self, z_TGN: Tensor, norm: nn.BatchNorm1d) -> tuple[Tensor, Tensor]:
        T = z_TGN.shape[0]
        zn_TGN = norm(z_TGN.transpose(1, 2).reshape(T * self.N, self.G)).view(T, self.N, self.G).transpose(1, 2)
        thr_TG1 = zn_TGN.amax(-1, keepdim=True).clamp_max(self.threshold)  # keep at least the max
        keep_TGN = zn_TGN >= thr_TG1
        g_TGN = z_TGN.masked_fill(~keep_TGN, float("-inf")).softmax(-1)
        return g_TGN, keep_TGN

    def forward(self, x_TD: Tensor):
        T = x_TD.shape[0]
        z1_TGN = self.w1(x_TD).view(T, self.G, self.N).float()
        z2_TGN = self.w2(x_TD).view(T, self.G, self.N).float()
        g1_TGN, keep1_TGN = self._gates(z1_TGN, self.norm1)
        g2_TGN, keep2_TGN = self._gates(z2_TGN, self.norm2)
        return g1_TGN, g2_TGN, z1_TGN, z2_TGN, keep1_TGN, keep2_TGN


def monet_aux_losses(g1_TGN: Tensor, g2_TGN: Tensor, *, uniformity_coef: float,
                     ambiguity_coef: float) -> dict[str, Tensor]:
    """Uniformity of sub-expert usage and ambiguity (1 - max gate), each scaled by its coefficient."""
    N = g1_TGN.shape[-1]
    unif = sum(N * (g.mean(0) - 1.0 / N).square().sum(-1).mean() for g in (g1_TGN, g2_TGN)) / 2
    amb = sum((1 - g.amax(-1)).mean() for g in (g1_TGN, g2_TGN)) / 2
    return {"monet_uniformity": uniformity_coef * unif, "monet_ambiguity": ambiguity_coef * amb}


class MonetLayer(nn.Module):
    """A Monet FFN (HD or VD). `forward(x)` accepts (..., D) and returns FFNOutput."""

    FEATURE_SOURCES = ("monet.experts", "monet.sub1", "monet.sub2", "monet.code")  # forward(x, features=True)

    def __init__(self, d_model: int, cfg: MonetConfig, router: MonetRouter | None = None):
        super().__init__()
        self.mode, self.N, self.G, self.M, self.k = cfg.mode, cfg.num_sub_experts, cfg.num_heads, cfg.d_expert, cfg.top_k
        self.aux_coefs = {"uniformity_coef": cfg.uniformity_coef, "ambiguity_coef": cfg.ambiguity_coef}
        self.router = router or MonetRouter(d_model, self.N, self.G, self.k)
        N, M, D = self.N, self.M, d_model
        if self.mode == "hd":
            self.u = nn.Linear(D, N * M)  # U_i rows [i*M, (i+1)*M), bias b1_i
            self.v = nn.Linear(N * M, D, bias=False)  # V_j columns [j*M, (j+1)*M)
            self.b2_ND = nn.Parameter(torch.zeros(N, D))
        elif self.mode == "vd":
            if M % 2 or D % 2:
                raise ValueError(f"Monet VD needs even d_expert and d_model, got {M} and {D}")
            M2, D2 = M // 2, D // 2
            self.u1, self.u2 = nn.Linear(D, N * M2), nn.Linear(D, N * M2)
            self.v11, self.v12 = nn.Linear(N * M2, D2, bias=False), nn.Linear(N * M2, D2, bias=False)
            self.v21, self.v22 = nn.Linear(N * M2, D2, bias=False), nn.Linear(N * M2, D2, bias=False)
            self.b1_ND2 = nn.Parameter(torch.zeros(N, D2))
            self.b2_ND2 = nn.Parameter(torch.zeros(N, D2))
        else:
            raise ValueError(f"Monet mode must be 'hd' or 'vd', got {self.mode!r}")
        for m in self.modules():  # GPT's init redraws weights only; start biases at zero
            if isinstance(m, nn.Linear) and m.bias is not None:
                nn.init.zeros_(m.bias)

    def _expert_params(self) -> int:
        return sum(p.numel() for n, p in self.named_parameters() if not n.startswith("router."))

    def active_params(self) -> tuple[int, int]:
        """(expert params, params of the ~G*k kept sub-experts per key set); the router counts as active."""
        total = self._expert_params()
        return total, int(total * min(1.0, self.G * self.k / self.N))

    def hidden(self, x_TD: Tensor, g1_TGN: Tensor, g2_TGN: Tensor):
        """Post-activation sub-expert hidden units: HD (h_TNM,), VD (h1_TNM2, h2_TNM2)."""
        if self.mode == "hd":
            return (relu2(self.u(x_TD)).view(x_TD.shape[0], self.N, self.M),)
        T = x_TD.shape[0]
        return relu2(self.u1(x_TD)).view(T, self.N, -1), relu2(self.u2(x_TD)).view(T, self.N, -1)

    def combine(self, hs, g1_TGN: Tensor, g2_TGN: Tensor) -> Tensor:
        g1, g2 = g1_TGN.to(hs[0].dtype), g2_TGN.to(hs[0].dtype)
        if self.mode == "hd":
            (h_TNM,) = hs
            c_TGM = torch.einsum("thi,tim->thm", g1, h_TNM)  # sum_i g1_hi h_i, per head
            z_TNM = torch.einsum("thj,thm->tjm", g2, c_TGM)  # sum_h g2_hj (...)
            return self.v(z_TNM.flatten(1)) + g2.sum(1) @ self.b2_ND
        h1, h2 = hs
        G1_TN, G2_TN = g1.sum(1), g2.sum(1)  # sum_h g_hi
        mix1_TGM = torch.einsum("thi,tim->thm", g1, h1)  # sum_i g1_hi h1_i
        mix2_TGM = torch.einsum("thj,tjm->thm", g2, h2)  # sum_j g2_hj h2_j
        top = (self.v11((G1_TN[..., None] * h1).flatten(1))
               + self.v12(torch.einsum("thi,thm->tim", g1, mix2_TGM).flatten(1)) + G1_TN @ self.b1_ND2)
        bot = (self.v21(torch.einsum("thj,thm->tjm", g2, mix1_TGM).flatten(1))
               + self.v22((G2_TN[..., None] * h2).flatten(1)) + G2_TN @ self.b2_ND2)
        return torch.cat((top, bot), dim=-1)

    def forward(self, x: Tensor, *, features: bool = False) -> FFNOutput:
        """With ``features``, ``out.features`` holds (see ``_features``) ``monet.experts``,
        ``monet.sub1``, ``monet.sub2`` and ``monet.code`` from this forward's gates and hidden units."""
        shape = x.shape
        x_TD = x.reshape(-1, shape[-1])
        g1, g2, z1, z2, keep1, keep2 = self.router(x_TD)
        hs = self.hidden(x_TD, g1, g2)
        y_TD = self.combine(hs, g1, g2)
        feats = self._features(hs, g1, g2, keep1, keep2) if features else {}
        return FFNOutput(y_TD.reshape(shape), monet_aux_losses(g1, g2, **self.aux_coefs), self._stats(hs, z1, z2, keep1, keep2), feats)

    @torch.no_grad()
    def _features(self, hs, g1_TGN: Tensor, g2_TGN: Tensor, keep1_TGN: Tensor, keep2_TGN: Tensor) -> dict:
        """Monet's feature sources, all zero outside the kept sub-experts:

        - ``monet.experts`` (N*N, column i*N + j): expert (i, j)'s weight sum_h g1_hi g2_hj;
        - ``monet.sub1`` / ``monet.sub2`` (N each): a sub-expert's gate summed over heads, G_i = sum_h g_hi;
        - ``monet.code`` (N*M): every sub-expert hidden unit times its sub-expert's G. HD: G1_i h_i
          (the weight of unit (i, m) summed over all experts (i, j)); VD: [G1_i h1_i ; G2_j h2_j].
        """
        T, N = g1_TGN.shape[0], self.N
        G1_TN, G2_TN = g1_TGN.sum(1), g2_TGN.sum(1)
        rows, blocks, vals = [], [], []
        for part, (h_TNm, G_TN, keep_TGN) in enumerate(zip(hs, (G1_TN, G2_TN), (keep1_TGN, keep2_TGN))):
            t_U, i_U = keep_TGN.any(1).nonzero(as_tuple=True)
            rows.append(t_U)
            blocks.append(i_U + part * N)
            vals.append(G_TN[t_U, i_U, None].to(h_TNm.dtype) * h_TNm[t_U, i_U])
        code = SparseCode(torch.cat(rows), torch.cat(blocks), torch.cat(vals), N * self.M)
        return {"monet.experts": expert_weights(g1_TGN, g2_TGN, keep1_TGN, keep2_TGN), "monet.sub1": G1_TN,
                "monet.sub2": G2_TN, "monet.code": code}

    @torch.no_grad()
    def _stats(self, hs, z1, z2, keep1, keep2) -> dict[str, Tensor]:
        T = z1.shape[0]
        p = torch.cat((z1, z2), 1).softmax(-1)
        used1_TN, used2_TN = keep1.any(1), keep2.any(1)  # kept by any head
        if self.mode == "hd":
            active = ((hs[0] > 0) & used1_TN[..., None]).sum()
        else:
            active = ((hs[0] > 0) & used1_TN[..., None]).sum() + ((hs[1] > 0) & used2_TN[..., None]).sum()
        return {
            "tokens_per_expert": torch.cat((keep1.sum((0, 1)), keep2.sum((0, 1)))).float(),  # 2N sub-experts
            "router_entropy": router_entropy(p),
            "dropped_frac": torch.zeros(()),
            "active_frac": active.float() / (T * self.N * self.M),
        }


def expert_weights(g1_TGN: Tensor, g2_TGN: Tensor, keep1_TGN: Tensor, keep2_TGN: Tensor) -> SparseCode:
    """sum_h g1_hi g2_hj over the pairs (i, j) kept in the same head, as a (T, N*N) SparseCode.

    A join of the two kept lists per (token, head): memory is the number of kept pairs,
    never T x N x N.
    """
    T, G, N = g1_TGN.shape
    t1, h1, i1 = keep1_TGN.nonzero(as_tuple=True)  # sorted by (t, h)
    t2, h2, j2 = keep2_TGN.nonzero(as_tuple=True)
    grp1, grp2 = t1 * G + h1, t2 * G + h2
    c2_TG = torch.bincount(grp2, minlength=T * G)
    start2_TG = torch.cumsum(c2_TG, 0) - c2_TG
    reps_1 = c2_TG[grp1]  # each kept i pairs with every kept j of its (t, h)
    a_P = torch.repeat_interleave(torch.arange(grp1.numel(), device=grp1.device), reps_1)
    first_1 = torch.cumsum(reps_1, 0) - reps_1
    b_P = start2_TG[grp1[a_P]] + torch.arange(a_P.numel(), device=a_P.device) - first_1[a_P]
    w_P = g1_TGN[t1[a_P], h1[a_P], i1[a_P]] * g2_TGN[t2[b_P], h2[b_P], j2[b_P]]
    return SparseCode(t1[a_P], i1[a_P] * N + j2[b_P], w_P[:, None], N * N)


class MonetStack:
    """Builds one model's Monet layers; owns the router each group of `router_share_every` sparse layers shares.

    `GPT` calls it for its sparse layers in order and drops it once built, so
    nothing is shared between two models built from the same config.
    """

    def __init__(self, cfg: ModelConfig):
        self.cfg = cfg
        self.routers: dict[int, MonetRouter] = {}  # router group -> its router

    def __call__(self, layer: int) -> MonetLayer:
        m = self.cfg.monet
        group = layer // self.cfg.moe_every // m.router_share_every  # sparse-layer index // share
        if group not in self.routers:
            self.routers[group] = MonetRouter(self.cfg.d_model, m.num_sub_experts, m.num_heads, m.top_k)
        return MonetLayer(self.cfg.d_model, m, router=self.routers[group])
