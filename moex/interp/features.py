"""Feature sources: the activations whose interpretability the suites measure.

Shape key: B batch, T time, P selected positions, F features of a source.

Every FFN layer returns its own feature sources when called with
``features=True`` (``GPT.forward(idx, features=True).layer_features``): the
values the forward pass computed, never re-derived here. Names are
``L{i}.<source>``; each layer class lists its sources in ``FEATURE_SOURCES``:

- dense MLP: ``mlp.pre``, ``mlp.post`` (hidden units before / after the activation);
- MoE layer: ``moe.code`` (gate-weighted wide code, E*H; W_dec applied to it gives the
  layer output), ``moe.code_raw`` (unweighted), ``moe.gates`` (E), kept assignments only;
- Monet: ``monet.experts`` (N*N expert weights), ``monet.sub1``/``monet.sub2`` (N), ``monet.code``;
- PEER: ``peer.code`` (gate-weighted, N*N), ``peer.code_raw``.
SAE latents are added by ``moex.interp.sae`` on top of a dense source.

On request (``resid=True``), ``L{i}.resid`` is the residual stream after block i
(D features): what the linear board probes read, not a sparse-feature source.

Stable API (the suites and probes build on it):
- ``source_names(model)``: every source name; ``resid_names(model)``: the residual streams;
- ``collect(model, idx_BT, select, resid=)``: {name: dense (B, T, F) tensor};
- ``iter_positions(model, seqs_BT, mask_BT, batch_size=, select=, resid=, sparse=)``: the rows at
  the masked positions (row-major order), batch by batch: {name: (P_batch, F) tensor}, or
  with ``sparse=True`` sparse sources as ``scipy.sparse.csr_matrix`` (float32) rows.
"""

from __future__ import annotations

from typing import Callable, Iterator

import numpy as np
import torch
from torch import Tensor

from moex.errors import MoexError
from moex.models.outputs import SparseCode


RESID = "resid"


class NoFeatureSource(MoexError, ValueError):
    """The model (or the selection) has no measurable feature source (the CLI prints one line)."""


def _layer_sources(ffn) -> tuple[str, ...]:
    return tuple(getattr(ffn, "FEATURE_SOURCES", ()))


def source_names(model) -> list[str]:
    """Every feature source of `model`, as `L{i}.<source>`."""
    return [f"L{i}.{n}" for i, b in enumerate(model.blocks) for n in _layer_sources(b.ffn)]


def resid_names(model) -> list[str]:
    """The residual-stream sources `L{i}.resid`, one per block."""
    return [f"L{i}.{RESID}" for i in range(len(model.blocks))]


def require_sources(model, select: Callable[[str], bool] = lambda name: True) -> list[str]:
    """The selected source names; NoFeatureSource (one line) when there is none."""
    names = [n for n in source_names(model) if select(n)]
    if not names:
        kinds = sorted({type(b.ffn).__name__ for b in model.blocks})
        raise NoFeatureSource(f"no measurable feature source in this model (FFN layers: {', '.join(kinds)}; "
                              "a layer lists its sources in FEATURE_SOURCES)")
    return names


@torch.no_grad()
def layer_features(model, idx_BT: Tensor, select: Callable[[str], bool] = lambda name: True, *,
                   resid: bool = False) -> dict:
    """{name: (B*T, F) tensor or SparseCode with B*T rows (row-major)} from one forward pass.

    With `resid=True` also the selected `L{i}.resid` (the residual stream after block i).
    """
    streams: dict[int, Tensor] = {}
    hooks = [block.register_forward_hook(lambda mod, args, out, i=i: streams.__setitem__(i, out[0]))
             for i, block in enumerate(model.blocks) if resid and select(f"L{i}.{RESID}")]
    try:
        out = model(idx_BT, features=True)
    finally:
        for h in hooks:
            h.remove()
    feats = {}
    for i, f in enumerate(out.layer_features):
        for name, v in f.items():
            if select(f"L{i}.{name}"):
                feats[f"L{i}.{name}"] = v
    for i, x_BTD in sorted(streams.items()):  # a block returns (x_BTD, FFNOutput)
        feats[f"L{i}.{RESID}"] = x_BTD.reshape(-1, x_BTD.shape[-1])
    return feats


def collect(model, idx_BT: Tensor, select: Callable[[str], bool] = lambda name: True, *,
            resid: bool = False) -> dict[str, Tensor]:
    """Run the model on `idx_BT`; return {"L{i}.<source>": dense (B, T, F)} for the selected sources.

    With `resid=True` also the selected `L{i}.resid`: the residual stream after block i.
    """
    B, T = idx_BT.shape
    return {k: (v.to_dense(B * T) if isinstance(v, SparseCode) else v).reshape(B, T, -1)
            for k, v in layer_features(model, idx_BT, select, resid=resid).items()}


def to_csr(code: SparseCode, num_rows: int):
    """A SparseCode as a scipy CSR matrix (float32; duplicate entries summed, explicit zeros dropped)."""
    import scipy.sparse as sp

    r, c, v = (t.cpu().numpy() for t in code.coo())
    m = sp.csr_matrix((v.astype(np.float32), (r, c)), shape=(num_rows, code.num_features))
    m.sum_duplicates()
    m.eliminate_zeros()
    return m


def iter_positions(model, seqs_BT: Tensor, pos_mask_BT: Tensor, *, batch_size: int = 32,
                   select: Callable[[str], bool] = lambda name: True, resid: bool = False,
                   sparse: bool = False) -> Iterator[dict]:
    """Stream features at the masked positions only, batch by batch (rows in row-major (b, t) order).

    Yields {source: (P_batch, F) tensor}; with ``sparse=True`` the layers' sparse sources come
    as scipy CSR matrices instead (never densified).
    """
    if not (resid and any(select(n) for n in resid_names(model))):
        require_sources(model, select)
    for s in range(0, seqs_BT.shape[0], batch_size):
        idx = seqs_BT[s : s + batch_size]
        rows_P = pos_mask_BT[s : s + batch_size].reshape(-1).nonzero().squeeze(-1)
        n = idx.numel()
        out = {}
        for k, v in layer_features(model, idx, select, resid=resid).items():
            if not isinstance(v, SparseCode):
                out[k] = v[rows_P]
            elif sparse:
                out[k] = to_csr(v.select_rows(rows_P, n), len(rows_P))
            else:
                out[k] = v.select_rows(rows_P, n).to_dense(len(rows_P))
        yield out
