"""The sparse MoE layer: router -> sort by expert -> expert MLPs -> weighted combine.

Shape key: T tokens, D model dim, E experts (El local to this rank), H hidden
units per expert, K experts per token, A assignments (token, expert) pairs.

The experts run either as one fused op (``moex.ops.expert_mlp``: the CPU default,
``gemm_backend=fused`` anywhere) or unfused: gather, grouped GEMMs on a named
backend, combine (the CUDA default and the expert-parallel path); see
docs/architecture.md. Dropless by default: every assignment is computed, grouped
by expert, with no padding and no T x E x C dispatch tensor (memory O(A*D + E*D*H);
O(A*H + T*D + E*D*H) on the fused path, which does not keep gathered rows). With
`capacity_factor` set, each expert keeps at most C = ceil(cf * T * K / E) assignments
(per sequence with ``capacity_per_sequence``), chosen by ``capacity_policy``
(moex.routers.capacity; gshard by default), and the rest are dropped (counted in the stats).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from moex.config import MoEConfig
from moex.models.mlp import DenseMLP
from moex.models.outputs import FFNOutput, SparseCode, router_entropy
from moex.ops import FUSED_IMPL, activations, count_active, expert_mlp, gated_scatter_add, grouped_mm, scatter_add_rows, sort_by_expert
from moex.routers import RouterOutput, build_router
from moex.routers.capacity import expert_capacity, keep_within_capacity, renormalise_survivors


class Experts(nn.Module):
    """E expert MLPs as stacked weights: ``y = code(x) @ w2_EHD[e]`` with ``code = act(x @ w1_EDH[e])``,
    or for SwiGLU ``silu(x @ w1_EDH[e]) * (x @ w3_EDH[e])`` (w1 = gate, w3 = up projection)."""

    def __init__(self, num_experts: int, d_model: int, d_expert: int, act: str = "relu", std: float = 0.02):
        super().__init__()
        self.w1_EDH = nn.Parameter(torch.randn(num_experts, d_model, d_expert) * std)
        self.w2_EHD = nn.Parameter(torch.randn(num_experts, d_expert, d_model) * std)
        gated = activations.get(act).gated
        self.w3_EDH = nn.Parameter(torch.randn(num_experts, d_model, d_expert) * std) if gated else None
        self.act_name, self.act = act, activations.get(act).fn

    @property
    def num_experts(self) -> int:
        return self.w1_EDH.shape[0]

    def hidden(self, x_AD: Tensor, counts_E: Tensor, backend: str = "auto") -> Tensor:
        """The hidden code h_AH of rows grouped by expert (:func:`moex.ops.activations.hidden_code`)."""
        pre_AH = grouped_mm(x_AD, self.w1_EDH, counts_E, backend=backend)
        up_AH = None if self.w3_EDH is None else grouped_mm(x_AD, self.w3_EDH, counts_E, backend=backend)
        return activations.hidden_code(self.act_name, pre_AH, up_AH)

    def forward(self, x_AD: Tensor, counts_E: Tensor, backend: str = "auto", gate_A: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Rows of x_AD grouped by expert (counts_E). Returns (y_AD, hidden h_AH).

        With ``gate_A`` (one gate per row) the output is already gate-weighted:
        ``y = (code * gate) @ w2``. Folding the gate into the (A, H) hidden
        layer is exact (the down-projection is linear) and H-wide instead of D-wide,
        and its gradient is a row-dot over H; ``h_AH`` is returned unweighted.
        """
        h_AH = self.hidden(x_AD, counts_E, backend)
        hw_AH = h_AH if gate_A is None else h_AH * gate_A.to(h_AH.dtype).unsqueeze(-1)
        return grouped_mm(hw_AH, self.w2_EHD, counts_E, backend=backend), h_AH


class SharedExperts(nn.Module):
    """Dense experts every token passes through (DeepSeek-MoE, Qwen2-MoE), as one MLP.

    N shared experts of H units each sum to one MLP with N*H units (their outputs are
    added ungated), so they are stored as one :class:`DenseMLP`. With ``gate`` the output
    is scaled per token by ``sigmoid(x . w_gate)`` (Qwen2-MoE's ``shared_expert_gate``).
    """

    def __init__(self, d_model: int, d_hidden: int, act: str, gate: bool):
        super().__init__()
        self.mlp = DenseMLP(d_model, d_hidden, act)
        self.gate = nn.Linear(d_model, 1, bias=False) if gate else None

    def forward(self, x_TD: Tensor) -> Tensor:
        return self.with_code(x_TD)[0]

    def with_code(self, x_TD: Tensor) -> tuple[Tensor, Tensor]:
        """(y, code): the output and its hidden code times the gate (``mlp.proj(code)`` = y, no bias)."""
        h_TH = self.mlp.hidden(x_TD)
        y_TD = self.mlp.proj(h_TH)
        if self.gate is None:
            return y_TD, h_TH
        g_T1 = torch.sigmoid(self.gate(x_TD))
        return g_T1 * y_TD, g_T1 * h_TH


def routing_stats(r: RouterOutput, num_experts: int, num_tokens: int) -> dict[str, Tensor]:
    with torch.no_grad():
        p = r.probs_TE.float()
        return {
            "tokens_per_expert": torch.bincount(r.expert_A, minlength=num_experts).float(),
            "router_entropy": router_entropy(p),
        }


class MoELayer(nn.Module):
    """A sparse FFN. `forward(x)` accepts any leading shape (..., D) and returns FFNOutput.

    ``y = sum_k gate_k * expert_k(x)`` over the routed experts, plus the shared experts'
    output when ``num_shared_experts > 0`` (``active_frac`` counts the routed code only).
    """

    FEATURE_SOURCES = ("moe.code", "moe.code_raw", "moe.gates")  # what forward(x, features=True) returns

    def __init__(self, d_model: int, cfg: MoEConfig, *, std: float = 0.02):
        super().__init__()
        self.cfg = cfg
        self.router = build_router(cfg.router, d_model=d_model, cfg=cfg)
        self.experts = Experts(cfg.num_experts, d_model, cfg.d_expert, cfg.activation, std)
        d_shared = cfg.num_shared_experts * (cfg.d_shared_expert or cfg.d_expert)
        self.shared = SharedExperts(d_model, d_shared, cfg.activation, cfg.shared_expert_gate) if d_shared else None
        if self.shared is not None:  # the shared experts' (gated) hidden code is one more source
            self.FEATURE_SOURCES = (*MoELayer.FEATURE_SOURCES, "moe.shared")
        # Expert-parallel dispatch is plugged in by moex.parallel (None = all experts local).
        self.dispatcher = None

    def forward(self, x: Tensor, *, features: bool = False) -> FFNOutput:
        """y = sum over the token's kept assignments of gate * expert(x).

        With ``features``, ``out.features`` holds what this forward computed, on the kept
        assignments only (capacity drops excluded), as SparseCodes over the E*H wide code:
        ``moe.code`` = gate * hidden (W_dec applied to it gives y exactly), ``moe.code_raw`` =
        the unweighted hidden units, ``moe.gates`` = the gate per expert (E columns); with shared
        experts also ``moe.shared`` (dense: their hidden code times their gate; ``shared.mlp.proj``
        of it is their output).
        """
        shape = x.shape
        x_TD = x.reshape(-1, shape[-1])
        T, E = x_TD.shape[0], self.cfg.num_experts
        r = self.router(x_TD, self.experts)
        stats = routing_stats(r, E, T)
        # One stable sort by expert (with a capacity cut, by expert and priority). S = kept rows.
        if self.cfg.capacity_factor is None:
            order_S, counts_E = sort_by_expert(r.expert_A, E)
        else:
            order_S, counts_E = self._within_capacity(r, T, shape)
        stats["dropped_frac"] = torch.tensor((r.expert_A.numel() - order_S.numel()) / max(1, r.expert_A.numel()))
        token_S = r.token_A.index_select(0, order_S)
        gate_S = r.gate_A.index_select(0, order_S)
        if self.cfg.capacity_factor is not None and self.cfg.capacity_policy == "gshard":
            gate_S = renormalise_survivors(gate_S, token_S, r.gate_A, r.token_A, T)
        impl = self._fused_impl(x_TD) if self.dispatcher is None else None
        if impl is not None:  # gather, both GEMMs, gate and combine in one op
            y_TD, h_SH = expert_mlp(x_TD, token_S, gate_S, counts_E, self.experts.w1_EDH, self.experts.w2_EHD,
                                    self.experts.act_name, w3_EDH=self.experts.w3_EDH, impl=impl)
        else:
            y_TD, h_SH = self._unfused(x_TD, token_S, gate_S, counts_E)
        # active hidden units per token / all E*H units (the wide sparse code)
        relu_code = impl is not None and self.experts.act_name == "relu"  # the op writes exact +0.0 when off
        stats["active_frac"] = count_active(h_SH.detach(), relu_code=relu_code) / (T * E * self.cfg.d_expert)
        feats = self._features(token_S, gate_S, counts_E, h_SH) if features else {}
        if self.shared is not None:
            y_sh, code_sh = self.shared.with_code(x_TD)
            y_TD = y_TD + y_sh
            if features:
                feats["moe.shared"] = code_sh.detach()
        return FFNOutput(y_TD.reshape(shape), r.aux_losses, stats, feats)

    def _features(self, token_S: Tensor, gate_S: Tensor, counts_E: Tensor, h_SH: Tensor) -> dict[str, SparseCode]:
        """The wide sparse code of the rows this forward kept (rows sorted by expert)."""
        if self.dispatcher is not None:
            raise ValueError("MoE feature sources need all experts local (no expert-parallel dispatcher)")
        E, H = self.cfg.num_experts, self.cfg.d_expert
        expert_S = torch.repeat_interleave(torch.arange(E, device=counts_E.device), counts_E).to(token_S.device)
        h_SH = h_SH.detach()
        g_S1 = gate_S.detach().to(h_SH.dtype).unsqueeze(-1)
        return {"moe.code": SparseCode(token_S, expert_S, h_SH * g_S1, E * H),
                "moe.code_raw": SparseCode(token_S, expert_S, h_SH, E * H),
                "moe.gates": SparseCode(token_S, expert_S, g_S1, E)}

    def _unfused(self, x_TD: Tensor, token_S: Tensor, gate_S: Tensor, counts_E: Tensor) -> tuple[Tensor, Tensor]:
        """Gather, grouped GEMMs (or the EP dispatcher), combine; the gate on the narrower side."""
        T = x_TD.shape[0]
        x_SD = x_TD.index_select(0, token_S)  # autograd keeps only token_S
        if self.dispatcher is None and self.cfg.d_expert <= x_TD.shape[-1]:
            # gate folded into the (S, H) hidden layer; unweighted combine
            y_SD, h_SH = self.experts(x_SD, counts_E, self._gemm_backend(), gate_S)
            return scatter_add_rows(y_SD, token_S, T), h_SH
        if self.dispatcher is None:  # wide experts (H > D): gate the (S, D) rows at the combine
            y_SD, h_SH = self.experts(x_SD, counts_E, self._gemm_backend())
        else:  # EP: the dispatcher sees rows and counts only
            y_SD, h_SH = self.dispatcher(self.experts, x_SD, counts_E, self._gemm_backend())
        return gated_scatter_add(y_SD, gate_S, token_S, T), h_SH

    def _fused_impl(self, x_TD: Tensor) -> str | None:
        """The fused expert MLP implementation to run, or None for the unfused path (:data:`FUSED_IMPL`)."""
        return FUSED_IMPL(self.cfg.gemm_backend, x_TD.device, x_TD.dtype)

    def _gemm_backend(self) -> str:
        """The grouped_mm backend of the unfused path (``fused`` falls back to ``auto`` under EP dispatch)."""
        return "auto" if self.cfg.gemm_backend == "fused" else self.cfg.gemm_backend

    def _within_capacity(self, r: RouterOutput, T: int, shape: torch.Size) -> tuple[Tensor, Tensor]:
        """Kept assignments sorted by expert under ``capacity_policy`` (moex.routers.capacity)."""
        c = self.cfg
        per_seq = c.capacity_per_sequence and len(shape) >= 3
        n = shape[-2] if per_seq else T  # tokens per capacity group
        C = expert_capacity(c.capacity_factor, n, c.top_k, c.num_experts)
        return keep_within_capacity(r.expert_A, r.token_A, r.choice_A, c.num_experts, T, C,
                                    policy=c.capacity_policy, group_size=n if per_seq else None)
