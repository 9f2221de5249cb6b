"""Feature sources: the activations whose interpretability the suites measure.

Shape key: B batch, T time, D model dim, E experts, H hidden units per expert,
A assignments, F features of a source.

Per layer (names `L{i}.<source>`):
- dense MLP: `mlp.pre` (pre-activation) and `mlp.post` (post-activation hidden units);
- MoE layer: `moe.code` — MoE-X's view of the layer as one wide sparse MLP: all
  experts' hidden units side by side (E·H features), zero for experts a token
  was not routed to; and `moe.gates` — the combine weight per expert (E features);
- any other FFN exposing `interp_features(x) -> {name: (..., F)}` (Monet, PEER).
SAE latents are added by `moex.interp.sae` on top of a dense source.

On request (`resid=True`), `L{i}.resid` is the residual stream after block i
(D features): what the linear board probes read, not a sparse-feature source.
"""

from __future__ import annotations

from typing import Callable, Iterator

import torch
from torch import Tensor

from moex.models.mlp import DenseMLP
from moex.models.moe import MoELayer
from moex.ops import sort_by_expert


def dense_features(mlp: DenseMLP, x_TD: Tensor) -> dict[str, Tensor]:
    pre = mlp.fc(x_TD)
    return {"mlp.pre": pre, "mlp.post": mlp.hidden(x_TD)}


def moe_features(layer: MoELayer, x_TD: Tensor) -> dict[str, Tensor]:
    E, H = layer.cfg.num_experts, layer.cfg.d_expert
    r = layer.router(x_TD, layer.experts)
    order_A, counts_E = sort_by_expert(r.expert_A, E)
    x_AD = x_TD.index_select(0, r.token_A.index_select(0, order_A))
    h_AH = layer.experts.hidden(x_AD, counts_E)
    token_A, expert_A = r.token_A[order_A], r.expert_A[order_A]
    code_TF = x_TD.new_zeros(x_TD.shape[0], E * H)
    cols_AH = expert_A[:, None] * H + torch.arange(H, device=x_TD.device)
    code_TF[token_A[:, None].expand_as(cols_AH), cols_AH] = h_AH
    gates_TE = x_TD.new_zeros(x_TD.shape[0], E)
    gates_TE.index_put_((r.token_A, r.expert_A), r.gate_A.to(x_TD.dtype), accumulate=True)
    return {"moe.code": code_TF, "moe.gates": gates_TE}


def layer_features(ffn: torch.nn.Module, x_TD: Tensor) -> dict[str, Tensor]:
    if isinstance(ffn, DenseMLP):
        return dense_features(ffn, x_TD)
    if isinstance(ffn, MoELayer):
        return moe_features(ffn, x_TD)
    if hasattr(ffn, "interp_features"):
        return ffn.interp_features(x_TD)
    raise TypeError(f"no feature source for FFN type {type(ffn).__name__}")


RESID = "resid"


@torch.no_grad()
def collect(model, idx_BT: Tensor, select: Callable[[str], bool] = lambda name: True, *,
            resid: bool = False) -> dict[str, Tensor]:
    """Run the model on `idx_BT`; return {"L{i}.<source>": (B, T, F)} for the selected sources.

    With `resid=True` also the selected `L{i}.resid`: the residual stream after block i.
    """
    inputs: dict[int, Tensor] = {}
    streams: dict[int, Tensor] = {}
    hooks = [
        block.ffn.register_forward_pre_hook(lambda mod, args, i=i: inputs.__setitem__(i, args[0]))
        for i, block in enumerate(model.blocks)
    ]
    if resid:  # a block returns (x_BTD, FFNOutput)
        hooks += [block.register_forward_hook(lambda mod, args, out, i=i: streams.__setitem__(i, out[0]))
                  for i, block in enumerate(model.blocks) if select(f"L{i}.{RESID}")]
    try:
        model(idx_BT)
    finally:
        for h in hooks:
            h.remove()
    B, T = idx_BT.shape
    out = {}
    for i, block in enumerate(model.blocks):
        wanted = [n for n in _source_names(block.ffn) if select(f"L{i}.{n}")]
        if not wanted:
            continue
        feats = layer_features(block.ffn, inputs[i].reshape(B * T, -1))
        for name in wanted:
            out[f"L{i}.{name}"] = feats[name].reshape(B, T, -1)
    for i, x_BTD in sorted(streams.items()):
        out[f"L{i}.{RESID}"] = x_BTD
    return out


def _source_names(ffn) -> list[str]:
    if isinstance(ffn, DenseMLP):
        return ["mlp.pre", "mlp.post"]
    if isinstance(ffn, MoELayer):
        return ["moe.code", "moe.gates"]
    if hasattr(ffn, "interp_feature_names"):
        return list(ffn.interp_feature_names())
    return []


def source_names(model) -> list[str]:
    """Every feature source of `model`, as `L{i}.<source>`."""
    return [f"L{i}.{n}" for i, b in enumerate(model.blocks) for n in _source_names(b.ffn)]


def resid_names(model) -> list[str]:
    """The residual-stream sources `L{i}.resid`, one per block."""
    return [f"L{i}.{RESID}" for i in range(len(model.blocks))]


def iter_positions(model, seqs_BT: Tensor, pos_mask_BT: Tensor, *, batch_size: int = 32,
                   select: Callable[[str], bool] = lambda name: True,
                   resid: bool = False) -> Iterator[dict[str, Tensor]]:
    """Stream features at the masked positions only, batch by batch: {source: (P_batch, F)}."""
    for s in range(0, seqs_BT.shape[0], batch_size):
        feats = collect(model, seqs_BT[s : s + batch_size], select, resid=resid)
        mask = pos_mask_BT[s : s + batch_size]
        yield {k: v[mask] for k, v in feats.items()}
