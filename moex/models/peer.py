"""PEER: Parameter Efficient Expert Retrieval (He 2024, "Mixture of A Million Experts").

Shape key (docs/architecture.md): T tokens, D model dim, G retrieval heads (h indexes
them), N sub-keys per half (`num_sub_experts`; N*N experts), D2 = D/2 sub-key dim, k experts
kept per head (`top_k`), P = N*N experts. The parameters `keys1_HNK`, `keys2_HNK` (G, N, D2)
keep the names saved checkpoints hold.

Expert p = (i, j), index i*N + j, is one hidden neuron: down vector u_p, up
vector v_p. Each head h has a query q = BatchNorm(W_h x) (optional norm, no
affine), split in halves q1, q2, and two sub-key sets C1, C2 (N x D2). The key
of expert (i, j) is [C1_i ; C2_j], so its score is q1.C1_i + q2.C2_j. Product-key
retrieval: top-k of each half, then top-k of the candidate sums (only the ~k ln k
rank pairs that can win, not all k^2) — exactly the top-k over all N^2 scores
(the identity the tests check).
Gates g = softmax over the k retrieved scores; output
    y = sum_h sum_{p in top-k(h)} g_hp * v_p * act(u_p . x)
Heads share the experts. Activation `activation` (ReLU default). Config: `model.peer`
(moex.config.PEERConfig).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from moex.config import ModelConfig, PEERConfig
from moex.models.mlp import activation
from moex.models.outputs import FFNOutput, SparseCode, router_entropy


def _candidate_pairs(k: int, device) -> tuple[Tensor, Tensor]:
    """Rank pairs (a, b) with (a+1)(b+1) <= k. With both halves sorted, pair (a, b) is beaten or
    tied by the (a+1)(b+1) pairs (a' <= a, b' <= b), so no other pair can enter the top k:
    ~k ln k candidates instead of k^2, same result."""
    a, b = zip(*[(i, j) for i in range(k) for j in range(k) if (i + 1) * (j + 1) <= k])
    return torch.tensor(a, device=device), torch.tensor(b, device=device)


def product_key_topk(s1_TGN: Tensor, s2_TGN: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Top-k of s1_i + s2_j over all (i, j) via per-half top-k. Returns (scores_TGk, index_TGk = i*N+j)."""
    N = s1_TGN.shape[-1]
    v1, i1 = s1_TGN.topk(k, dim=-1)  # sorted, descending
    v2, i2 = s2_TGN.topk(k, dim=-1)
    a_c, b_c = _candidate_pairs(k, s1_TGN.device)
    cand_TGc = v1.index_select(-1, a_c) + v2.index_select(-1, b_c)
    score_TGk, pos = cand_TGc.topk(k, dim=-1)
    index_TGk = i1.gather(-1, a_c[pos]) * N + i2.gather(-1, b_c[pos])
    return score_TGk, index_TGk


class PEERLayer(nn.Module):
    """PEER FFN. `forward(x)` accepts (..., D) and returns FFNOutput."""

    FEATURE_SOURCES = ("peer.code", "peer.code_raw")  # what forward(x, features=True) returns

    def __init__(self, d_model: int, cfg: PEERConfig):
        super().__init__()
        if d_model % 2:
            raise ValueError(f"PEER splits the query in halves: d_model={d_model} must be even")
        self.N, self.G, self.k, self.D = cfg.num_sub_experts, cfg.num_heads, cfg.top_k, d_model
        if not 1 <= self.k <= self.N:
            raise ValueError(f"PEER needs 1 <= top_k <= num_sub_experts, got {self.k}, {self.N}")
        D2 = d_model // 2
        self.query = nn.Linear(d_model, self.G * d_model, bias=False)
        self.norm = nn.BatchNorm1d(d_model, affine=False) if cfg.query_norm else None
        self.keys1_HNK = nn.Parameter(torch.randn(self.G, self.N, D2) / D2**0.5)
        self.keys2_HNK = nn.Parameter(torch.randn(self.G, self.N, D2) / D2**0.5)
        self.down = nn.Embedding(self.N * self.N, d_model)  # u_p
        self.up = nn.Embedding(self.N * self.N, d_model)  # v_p
        self.act = activation(cfg.activation)

    def active_params(self) -> tuple[int, int]:
        """(expert params, params of the G*k retrieved neurons); query and keys count as active."""
        total = self.down.weight.numel() + self.up.weight.numel()
        return total, int(total * min(1.0, self.G * self.k / (self.N * self.N)))

    def scores(self, x_TD: Tensor) -> tuple[Tensor, Tensor]:
        """Sub-key scores of both halves, (T, G, N) each."""
        T = x_TD.shape[0]
        q_TGD = self.query(x_TD).view(T, self.G, self.D)
        if self.norm is not None:
            q_TGD = self.norm(q_TGD.reshape(T * self.G, self.D)).view(T, self.G, self.D)
        q1, q2 = q_TGD.float().chunk(2, dim=-1)
        s1_TGN = torch.einsum("thk,hnk->thn", q1, self.keys1_HNK.float())
        s2_TGN = torch.einsum("thk,hnk->thn", q2, self.keys2_HNK.float())
        return s1_TGN, s2_TGN

    def forward(self, x: Tensor, *, features: bool = False) -> FFNOutput:
        """With ``features``, ``out.features`` holds SparseCodes over the N*N experts (column = expert
        index i*N + j) on the retrieved experts only: ``peer.code`` = sum_h g_hp act(u_p . x) (the up
        vectors applied to it give y exactly) and ``peer.code_raw`` = act(u_p . x)."""
        shape = x.shape
        x_TD = x.reshape(-1, shape[-1])
        score_TGk, index_TGk = product_key_topk(*self.scores(x_TD), self.k)
        g_TGk = score_TGk.softmax(-1).to(x_TD.dtype)
        P = self.N * self.N
        if P <= self.G * self.k * self.D:  # few experts: two GEMMs over all P beat gathering T*G*k rows of D
            y_TD, a_TGk = self._forward_dense(x_TD, g_TGk, index_TGk)
        else:
            y_TD, a_TGk = self._forward_gather(x_TD, g_TGk, index_TGk)
        with torch.no_grad():
            p = g_TGk.float()
            stats = {
                "tokens_per_expert": torch.bincount(index_TGk.reshape(-1), minlength=P).float(),
                "router_entropy": router_entropy(p),  # over the k retrieved
                "dropped_frac": torch.zeros(()),
                "active_frac": (a_TGk > 0).sum().float() / (x_TD.shape[0] * P),
            }
        feats = self._features(g_TGk, a_TGk, index_TGk) if features else {}
        return FFNOutput(y_TD.reshape(shape), {}, stats, feats)

    @torch.no_grad()
    def _features(self, g_TGk: Tensor, a_TGk: Tensor, index_TGk: Tensor) -> dict[str, SparseCode]:
        T, P = g_TGk.shape[0], self.N * self.N
        idx_TK = index_TGk.reshape(T, -1)
        rows_TK = torch.arange(T, device=idx_TK.device)[:, None].expand_as(idx_TK)
        # an expert retrieved by several heads: the gated code adds up, the raw activation counts once
        sorted_TK, order_TK = idx_TK.sort(-1)
        first_TK = torch.ones_like(sorted_TK, dtype=torch.bool)
        first_TK[:, 1:] = sorted_TK[:, 1:] != sorted_TK[:, :-1]
        raw_TK = a_TGk.reshape(T, -1).gather(1, order_TK) * first_TK
        code = SparseCode(rows_TK.reshape(-1), idx_TK.reshape(-1), (g_TGk * a_TGk).reshape(-1, 1), P)
        raw = SparseCode(rows_TK.reshape(-1), sorted_TK.reshape(-1), raw_TK.reshape(-1, 1), P)
        return {"peer.code": code, "peer.code_raw": raw}

    def _forward_gather(self, x_TD, g_TGk, index_TGk):
        """Retrieval proper: gather the G*k neurons of each token (memory T*G*k*D)."""
        u_TGkD, v_TGkD = self.down(index_TGk), self.up(index_TGk)
        a_TGk = self.act(torch.einsum("thkd,td->thk", u_TGkD, x_TD))
        return torch.einsum("thk,thkd->td", g_TGk * a_TGk, v_TGkD), a_TGk

    def _forward_dense(self, x_TD, g_TGk, index_TGk):
        """Same result through all P neurons: pre-activations x U^T (T x P), then a sparse-in-content
        T x P combine matrix times V. Exact; used when P <= G*k*D (small expert counts)."""
        T = x_TD.shape[0]
        a_TGk = self.act((x_TD @ self.down.weight.T).gather(1, index_TGk.reshape(T, -1)).view_as(g_TGk))
        w_TP = torch.zeros(T, self.N * self.N, dtype=x_TD.dtype, device=x_TD.device)
        w_TP = w_TP.scatter_add(1, index_TGk.reshape(T, -1), (g_TGk * a_TGk).reshape(T, -1))
        return w_TP @ self.up.weight, a_TGk


def peer_layers(cfg: ModelConfig):
    """Builds one model's PEER layers (each independent): `layer -> PEERLayer`."""
    return lambda layer: PEERLayer(cfg.d_model, cfg.peer)
