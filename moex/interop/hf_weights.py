"""Whole-model weight mapping between Hugging Face checkpoints and moex state dicts.

Shape key (docs/architecture.md): D model dim, G heads, R key/value heads, W head dim,
F dense hidden units.

Attention: q/k/v (G*W, R*W, R*W rows) are stacked into moex's `attn.qkv`. Hugging
Face's RoPE rotates the pair (i, i + W/2) of each head ("rotate half"); moex rotates
(2i, 2i+1) with the same frequency, so q and k rows (and their biases and QK-norm
scales) are reordered within each head: moex row 2i = HF row i, row 2i+1 = HF row
i + W/2. Attention scores, and so every output, are unchanged. GPT-2's Conv1D
weights are stored (in, out) and are transposed. MoE blocks go through
`moex.interop.layers` (one block's keys at a time); on disk experts use the
per-expert names every `transformers` version reads.
"""

from __future__ import annotations

import torch
from torch import Tensor

from moex import config as C
from moex.interop.errors import InteropError
from moex.interop.layers import _LEGACY_NAMES, from_peer_state, to_peer_state

_IGNORED = ("rotary_emb.inv_freq", ".attn.bias", ".attn.masked_bias")  # buffers older checkpoints saved


def rope_row_order(n_heads: int, head_dim: int) -> Tensor:
    """Index i such that moex_rows = hf_rows[i] (interleaved pairs from rotate-half pairs), per head."""
    half = head_dim // 2
    within = torch.stack([torch.arange(half), torch.arange(half) + half], dim=1).flatten()
    return (torch.arange(n_heads)[:, None] * head_dim + within).flatten()


def _moe_prefix(family: str) -> str:
    return "block_sparse_moe." if family == "mixtral" else "mlp."


def _sparse(m: C.ModelConfig, i: int) -> bool:
    return m.ffn == "moe" and i % m.moe_every == m.moe_every - 1


def _strip(sd: dict[str, Tensor], family: str) -> dict[str, Tensor]:
    """Drop the base-model prefix (`model.` / `transformer.`), present or not, and saved buffers."""
    pre = "transformer." if family == "gpt2" else "model."
    return {(k[len(pre):] if k.startswith(pre) else k): v for k, v in sd.items() if not k.endswith(_IGNORED)}


def import_state(family: str, hf_sd: dict[str, Tensor], m: C.ModelConfig) -> dict[str, Tensor]:
    """A Hugging Face state dict -> the state dict of `moex.models.GPT(m)`. Every source tensor must be used."""
    sd = _strip(hf_sd, family)
    out = _import_gpt2(sd, m) if family == "gpt2" else _import_llama_like(family, sd, m)
    if not m.tie_embeddings:
        out["lm_head.weight"] = sd.pop("lm_head.weight")
    else:
        sd.pop("lm_head.weight", None)  # tied: the same tensor as the embedding
    if sd:
        raise InteropError(f"{family}: {len(sd)} tensors have no place in the moex model, e.g. {sorted(sd)[:4]}")
    return out


def _import_llama_like(family: str, sd: dict, m: C.ModelConfig) -> dict:
    G, R, W = m.n_head, m.n_kv_head or m.n_head, m.d_model // m.n_head
    pq, pk = rope_row_order(G, W), rope_row_order(R, W)
    out = {"wte.weight": sd.pop("embed_tokens.weight"), "ln_f.weight": sd.pop("norm.weight")}
    for i in range(m.n_layer):
        p, b = f"layers.{i}.", f"blocks.{i}."
        out[b + "ln1.weight"] = sd.pop(p + "input_layernorm.weight")
        out[b + "ln2.weight"] = sd.pop(p + "post_attention_layernorm.weight")
        a = p + "self_attn."
        q, k, v = (sd.pop(a + f"{n}_proj.weight") for n in "qkv")
        out[b + "attn.qkv.weight"] = torch.cat([q[pq], k[pk], v])
        if m.bias == "qkv":
            q, k, v = (sd.pop(a + f"{n}_proj.bias") for n in "qkv")
            out[b + "attn.qkv.bias"] = torch.cat([q[pq], k[pk], v])
        out[b + "attn.proj.weight"] = sd.pop(a + "o_proj.weight")
        if m.qk_norm:  # OLMoE: one norm over all heads, its scale reordered like the rows
            out[b + "attn.q_norm.weight"] = sd.pop(a + "q_norm.weight")[pq]
            out[b + "attn.k_norm.weight"] = sd.pop(a + "k_norm.weight")[pk]
        if _sparse(m, i):
            pre = p + _moe_prefix(family)
            block = {k[len(pre):]: sd.pop(k) for k in [k for k in sd if k.startswith(pre)]}
            out.update({b + "ffn." + k: v for k, v in from_peer_state(family, block).items()})
        else:
            for ours, theirs in (("fc", "gate_proj"), ("up", "up_proj"), ("proj", "down_proj")):
                out[b + f"ffn.{ours}.weight"] = sd.pop(p + f"mlp.{theirs}.weight")
    return out


def _import_gpt2(sd: dict, m: C.ModelConfig) -> dict:
    out = {"wte.weight": sd.pop("wte.weight"), "wpe.weight": sd.pop("wpe.weight")}
    names = {"ln_1": "ln1", "ln_2": "ln2", "attn.c_attn": "attn.qkv", "attn.c_proj": "attn.proj",
             "mlp.c_fc": "ffn.fc", "mlp.c_proj": "ffn.proj"}
    for i in range(m.n_layer):
        for theirs, ours in names.items():
            w = sd.pop(f"h.{i}.{theirs}.weight")
            out[f"blocks.{i}.{ours}.weight"] = w if theirs.startswith("ln") else w.t().contiguous()  # Conv1D: (in, out)
            out[f"blocks.{i}.{ours}.bias"] = sd.pop(f"h.{i}.{theirs}.bias")
    out["ln_f.weight"], out["ln_f.bias"] = sd.pop("ln_f.weight"), sd.pop("ln_f.bias")
    return out


def export_state(family: str, sd: dict[str, Tensor], m: C.ModelConfig) -> dict[str, Tensor]:
    """A moex GPT state dict -> the Hugging Face checkpoint of `family` (on-disk names)."""
    out = _export_gpt2(sd, m) if family == "gpt2" else _export_llama_like(family, sd, m)
    if not m.tie_embeddings:
        out["lm_head.weight"] = sd["lm_head.weight"]
    return {k: v.detach().clone().contiguous() for k, v in out.items()}  # own storage each: safetensors refuses shared


def _export_llama_like(family: str, sd: dict, m: C.ModelConfig) -> dict:
    D, G, R, W = m.d_model, m.n_head, m.n_kv_head or m.n_head, m.d_model // m.n_head
    iq, ik = rope_row_order(G, W).argsort(), rope_row_order(R, W).argsort()
    out = {"model.embed_tokens.weight": sd["wte.weight"], "model.norm.weight": sd["ln_f.weight"]}
    for i in range(m.n_layer):
        p, b = f"model.layers.{i}.", f"blocks.{i}."
        out[p + "input_layernorm.weight"] = sd[b + "ln1.weight"]
        out[p + "post_attention_layernorm.weight"] = sd[b + "ln2.weight"]
        a = p + "self_attn."
        for kind in ("weight", "bias") if m.bias == "qkv" else ("weight",):
            q, k, v = sd[b + f"attn.qkv.{kind}"].split([D, R * W, R * W])
            out[a + f"q_proj.{kind}"], out[a + f"k_proj.{kind}"], out[a + f"v_proj.{kind}"] = q[iq], k[ik], v
        out[a + "o_proj.weight"] = sd[b + "attn.proj.weight"]
        if m.qk_norm:
            out[a + "q_norm.weight"] = sd[b + "attn.q_norm.weight"][iq]
            out[a + "k_norm.weight"] = sd[b + "attn.k_norm.weight"][ik]
        if _sparse(m, i):
            block = {k[len(b + "ffn."):]: v for k, v in sd.items() if k.startswith(b + "ffn.")}
            out.update({p + _moe_prefix(family) + k: v for k, v in _per_expert(family, to_peer_state(family, block)).items()})
        else:
            for ours, theirs in (("fc", "gate_proj"), ("up", "up_proj"), ("proj", "down_proj")):
                out[p + f"mlp.{theirs}.weight"] = sd[b + f"ffn.{ours}.weight"]
    return out


def _per_expert(family: str, block: dict) -> dict:
    """transformers 5's stacked expert tensors -> one Linear per expert (what checkpoints hold)."""
    g, u, d = _LEGACY_NAMES[family]
    gate_up, down = block.pop("experts.gate_up_proj"), block.pop("experts.down_proj")  # (E, 2H, D), (E, D, H)
    H = gate_up.shape[1] // 2
    for e in range(gate_up.shape[0]):
        block[f"experts.{e}.{g}.weight"] = gate_up[e, :H]
        block[f"experts.{e}.{u}.weight"] = gate_up[e, H:]
        block[f"experts.{e}.{d}.weight"] = down[e]
    return block


def _export_gpt2(sd: dict, m: C.ModelConfig) -> dict:
    out = {"transformer.wte.weight": sd["wte.weight"], "transformer.wpe.weight": sd["wpe.weight"],
           "transformer.ln_f.weight": sd["ln_f.weight"], "transformer.ln_f.bias": sd["ln_f.bias"]}
    names = {"ln_1": "ln1", "ln_2": "ln2", "attn.c_attn": "attn.qkv", "attn.c_proj": "attn.proj",
             "mlp.c_fc": "ffn.fc", "mlp.c_proj": "ffn.proj"}
    for i in range(m.n_layer):
        for theirs, ours in names.items():
            w = sd[f"blocks.{i}.{ours}.weight"]
            out[f"transformer.h.{i}.{theirs}.weight"] = w if theirs.startswith("ln") else w.t()
            out[f"transformer.h.{i}.{theirs}.bias"] = sd[f"blocks.{i}.{ours}.bias"]
    return out
