"""PEER: Parameter Efficient Expert Retrieval (He 2024, "Mixture of A Million Experts").

Shape key: T tokens, D model dim, H retrieval heads, N sub-keys per half
(`num_sub_experts`; N*N experts), K2 = D/2 sub-key dim, k experts kept per head
(`top_k`), P = N*N experts.

Expert p = (i, j), index i*N + j, is one hidden neuron: down vector u_p, up
vector v_p. Each head h has a query q = BatchNorm(W_h x) (optional norm, no
affine), split in halves q1, q2, and two sub-key sets C1, C2 (N x K2). The key
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


def product_key_topk(s1_THN: Tensor, s2_THN: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Top-k of s1_i + s2_j over all (i, j) via per-half top-k. Returns (scores_THk, index_THk = i*N+j)."""
    N = s1_THN.shape[-1]
    v1, i1 = s1_THN.topk(k, dim=-1)  # sorted, descending
    v2, i2 = s2_THN.topk(k, dim=-1)
    a_C, b_C = _candidate_pairs(k, s1_THN.device)
    cand_THC = v1.index_select(-1, a_C) + v2.index_select(-1, b_C)
    score_THk, pos = cand_THC.topk(k, dim=-1)
    index_THk = i1.gather(-1, a_C[pos]) * N + i2.gather(-1, b_C[pos])
    return score_THk, index_THk


class PEERLayer(nn.Module):
    """PEER FFN. `forward(x)` accepts (..., D) and returns FFNOutput."""

    FEATURE_SOURCES = ("peer.code", "peer.code_raw")  # what forward(x, features=True) returns

    def __init__(self, d_model: int, cfg: PEERConfig):
        super().__init__()
        if d_model % 2:
            raise ValueError(f"PEER splits the query in halves: d_model={d_model} must be even")
        self.N, self.H, self.k, self.D = cfg.num_sub_experts, cfg.num_heads, cfg.top_k, d_model
        if not 1 <= self.k <= self.N:
            raise ValueError(f"PEER needs 1 <= top_k <= num_sub_experts, got {self.k}, {self.N}")
        K2 = d_model // 2
        self.query = nn.Linear(d_model, self.H * d_model, bias=False)
        self.norm = nn.BatchNorm1d(d_model, affine=False) if cfg.query_norm else None
        self.keys1_HNK = nn.Parameter(torch.randn(self.H, self.N, K2) / K2**0.5)
        self.keys2_HNK = nn.Parameter(torch.randn(self.H, self.N, K2) / K2**0.5)
        self.down = nn.Embedding(self.N * self.N, d_model)  # u_p
        self.up = nn.Embedding(self.N * self.N, d_model)  # v_p
        self.act = activation(cfg.activation)

    def active_params(self) -> tuple[int, int]:
        """(expert params, params of the H*k retrieved neurons); query and keys count as active."""
        total = self.down.weight.numel() + self.up.weight.numel()
        return total, int(total * min(1.0, self.H * self.k / (self.N * self.N)))

    def scores(self, x_TD: Tensor) -> tuple[Tensor, Tensor]:
        """Sub-key scores of both halves, (T, H, N) each."""
        T = x_TD.shape[0]
        q_THD = self.query(x_TD).view(T, self.H, self.D)
        if self.norm is not None:
            q_THD = self.norm(q_THD.reshape(T * self.H, self.D)).view(T, self.H, self.D)
        q1, q2 = q_THD.float().chunk(2, dim=-1)
        s1_THN = torch.einsum("thk,hnk->thn", q1, self.keys1_HNK.float())
        s2_THN = torch.einsum("thk,hnk->thn", q2, self.keys2_HNK.float())
        return s1_THN, s2_THN

    def forward(self, x: Tensor, *, features: bool = False) -> FFNOutput:
        """With ``features``, ``out.features`` holds SparseCodes over the N*N experts (column = expert
        index i*N + j) on the retrieved experts only: ``peer.code`` = sum_h g_hp act(u_p . x) (the up
        vectors applied to it give y exactly) and ``peer.code_raw`` = act(u_p . x)."""
        shape = x.shape
        x_TD = x.reshape(-1, shape[-1])
        score_THk, index_THk = product_key_topk(*self.scores(x_TD), self.k)
        g_THk = score_THk.softmax(-1).to(x_TD.dtype)
        P = self.N * self.N
        if P <= self.H * self.k * self.D:  # few experts: two GEMMs over all P beat gathering T*H*k rows of D
            y_TD, a_THk = self._forward_dense(x_TD, g_THk, index_THk)
        else:
            y_TD, a_THk = self._forward_gather(x_TD, g_THk, index_THk)
        with torch.no_grad():
            p = g_THk.float()
            stats = {
                "tokens_per_expert": torch.bincount(index_THk.reshape(-1), minlength=P).float(),
                "router_entropy": router_entropy(p),  # over the k retrieved
                "dropped_frac": torch.zeros(()),
                "active_frac": (a_THk > 0).sum().float() / (x_TD.shape[0] * P),
            }
        feats = self._features(g_THk, a_THk, index_THk) if features else {}
        return FFNOutput(y_TD.reshape(shape), {}, stats, feats)

    @torch.no_grad()
    def _features(self, g_THk: Tensor, a_THk: Tensor, index_THk: Tensor) -> dict[str, SparseCode]:
        T, P = g_THk.shape[0], self.N * self.N
        idx_TK = index_THk.reshape(T, -1)
        rows_TK = torch.arange(T, device=idx_TK.device)[:, None].expand_as(idx_TK)
        # an expert retrieved by several heads: the gated code adds up, the raw activation counts once
        sorted_TK, order_TK = idx_TK.sort(-1)
        first_TK = torch.ones_like(sorted_TK, dtype=torch.bool)
        first_TK[:, 1:] = sorted_TK[:, 1:] != sorted_TK[:, :-1]
        raw_TK = a_THk.reshape(T, -1).gather(1, order_TK) * first_TK
        code = SparseCode(rows_TK.reshape(-1), idx_TK.reshape(-1), (g_THk * a_THk).reshape(-1, 1), P)
        raw = SparseCode(rows_TK.reshape(-1), sorted_TK.reshape(-1), raw_TK.reshape(-1, 1), P)
        return {"peer.code": code, "peer.code_raw": raw}

    def _forward_gather(self, x_TD, g_THk, index_THk):
        """Retrieval proper: gather the H*k neurons of each token (memory T*H*k*D)."""
        u_THkD, v_THkD = self.down(index_THk), self.up(index_THk)
        a_THk = self.act(torch.einsum("thkd,td->thk", u_THkD, x_TD))
        return torch.einsum("thk,thkd->td", g_THk * a_THk, v_THkD), a_THk

    def _forward_dense(self, x_TD, g_THk, index_THk):
        """Same result through all P neurons: pre-activations x U^T (T x P), then a sparse-in-content
        T x P combine matrix times V. Exact; used when P <= H*k*D (small expert counts)."""
        T = x_TD.shape[0]
        a_THk = self.act((x_TD @ self.down.weight.T).gather(1, index_THk.reshape(T, -1)).view_as(g_THk))
        w_TP = torch.zeros(T, self.N * self.N, dtype=x_TD.dtype, device=x_TD.device)
        w_TP = w_TP.scatter_add(1, index_THk.reshape(T, -1), (g_THk * a_THk).reshape(T, -1))
        return w_TP @ self.up.weight, a_THk


def peer_layers(cfg: ModelConfig):
    """Builds one model's PEER layers (each independent): `layer -> PEERLayer`."""
    return lambda layer: PEERLayer(cfg.d_model, cfg.peer)
