"""Hugging Face `config.json` <-> moex `ModelConfig`, for the families in docs/interop.md.

Configs are read as plain dicts (no `transformers` needed); a field a checkpoint
leaves out takes the `transformers` class default. Anything a family can set that
moex cannot compute exactly is refused with a message naming the field.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

from moex import config as C
from moex.interop.errors import InteropError

LLAMA_LIKE = ("llama", "mixtral", "olmoe", "qwen2_moe")
MOE_FAMILIES = ("mixtral", "olmoe", "qwen2_moe")
FAMILIES = (*LLAMA_LIKE, "gpt2")
ARCHITECTURES = {"llama": "LlamaForCausalLM", "mixtral": "MixtralForCausalLM", "olmoe": "OlmoeForCausalLM",
                 "qwen2_moe": "Qwen2MoeForCausalLM", "gpt2": "GPT2LMHeadModel"}
# transformers' defaults for the fields a published config.json may omit
_DEFAULTS = {
    "llama": dict(rms_norm_eps=1e-6, rope_theta=10000.0, tie_word_embeddings=False, hidden_act="silu",
                  attention_bias=False, mlp_bias=False, max_position_embeddings=2048),
    "mixtral": dict(rms_norm_eps=1e-5, rope_theta=1e6, tie_word_embeddings=False, hidden_act="silu",
                    num_key_value_heads=8, max_position_embeddings=4096 * 32, sliding_window=None),
    "olmoe": dict(rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=False, hidden_act="silu",
                  norm_topk_prob=False, clip_qkv=None, attention_bias=False, max_position_embeddings=4096),
    "qwen2_moe": dict(rms_norm_eps=1e-6, rope_theta=10000.0, tie_word_embeddings=False, hidden_act="silu",
                      norm_topk_prob=False, decoder_sparse_step=1, mlp_only_layers=[], qkv_bias=True,
                      use_sliding_window=False, max_position_embeddings=32768),
    "gpt2": dict(n_inner=None, activation_function="gelu_new", layer_norm_epsilon=1e-5, tie_word_embeddings=True,
                 scale_attn_weights=True, scale_attn_by_inverse_layer_idx=False, n_positions=1024),
}
_CLASS_NAMES = {"mixtral": "MixtralConfig", "olmoe": "OlmoeConfig", "qwen2_moe": "Qwen2MoeConfig"}


def read_hf_config(directory: str | Path) -> dict:
    f = Path(directory) / "config.json"
    if not f.is_file():
        raise InteropError(f"{directory}: no config.json (not a Hugging Face checkpoint directory)")
    try:
        return json.loads(f.read_text())
    except json.JSONDecodeError as e:
        raise InteropError(f"{f}: not valid JSON ({e})") from None


def family_of(hf: dict) -> str:
    family = hf.get("model_type")
    if family not in FAMILIES:
        raise InteropError(f"model_type {family!r} is not supported; supported families: {', '.join(FAMILIES)} "
                           f"(docs/interop.md)")
    return family


def _get(hf: dict, family: str, key: str):
    if key == "rope_theta" and "rope_parameters" in hf:  # transformers 5 nests it
        return (hf["rope_parameters"] or {}).get("rope_theta", _DEFAULTS[family]["rope_theta"])
    return hf[key] if key in hf else _DEFAULTS[family].get(key)


def _refuse(cond: bool, family: str, what: str) -> None:
    if cond:
        raise InteropError(f"{family}: {what} is not supported by moex (docs/interop.md)")


def _check_rope(hf: dict, family: str) -> None:
    rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    kind = rope.get("rope_type", rope.get("type", "default"))
    _refuse(kind != "default", family, f"RoPE scaling {kind!r}")
    _refuse(hf.get("partial_rotary_factor", 1.0) != 1.0, family, "partial rotary embeddings")


def to_moex_config(hf: dict) -> C.ModelConfig:
    """The moex ModelConfig that computes what the Hugging Face model computes."""
    family = family_of(hf)
    g = lambda key: _get(hf, family, key)  # noqa: E731
    if family == "gpt2":
        _refuse(g("activation_function") not in ("gelu_new", "gelu_pytorch_tanh"), family,
                f"activation_function={g('activation_function')!r}")
        _refuse(not g("scale_attn_weights") or g("scale_attn_by_inverse_layer_idx"), family, "attention scaling other than 1/sqrt(head dim)")
        D = hf["n_embd"]
        model = dict(vocab_size=hf["vocab_size"], n_layer=hf["n_layer"], n_head=hf["n_head"], d_model=D,
                     block_size=g("n_positions"), pos_emb="learned", tie_embeddings=bool(g("tie_word_embeddings")),
                     ffn="dense", d_ff=g("n_inner") or 4 * D, mlp_activation="gelu_tanh", norm="layernorm",
                     norm_eps=g("layer_norm_epsilon"), bias="all")
        return _validated(model)
    D, N = hf["hidden_size"], hf["num_attention_heads"]
    _refuse(hf.get("head_dim") not in (None, D // N), family, f"head_dim={hf.get('head_dim')} != hidden_size/heads")
    _refuse(g("hidden_act") != "silu", family, f"hidden_act={g('hidden_act')!r}")
    _refuse(bool(g("attention_bias")) or bool(g("mlp_bias")), family, "attention_bias/mlp_bias")
    _refuse(g("clip_qkv") is not None, family, "clip_qkv")
    _check_rope(hf, family)
    block = g("max_position_embeddings")
    window = g("sliding_window") if family != "qwen2_moe" or g("use_sliding_window") else None
    if window:  # attention within one window is exact: cap the context there
        block = min(block, window)
    model = dict(vocab_size=hf["vocab_size"], n_layer=hf["num_hidden_layers"], n_head=N, d_model=D,
                 n_kv_head=hf.get("num_key_value_heads") or g("num_key_value_heads") or N, block_size=block,
                 pos_emb="rope", rope_base=float(g("rope_theta")), norm="rmsnorm", norm_eps=g("rms_norm_eps"),
                 tie_embeddings=bool(g("tie_word_embeddings")), qk_norm=family == "olmoe",
                 bias="qkv" if family == "qwen2_moe" and g("qkv_bias") else "none",
                 d_ff=hf["intermediate_size"], mlp_activation="swiglu")
    if family == "llama":
        model["ffn"] = "dense"
    else:
        _refuse(family == "qwen2_moe" and bool(g("mlp_only_layers")), family, "mlp_only_layers")
        from moex.interop.layers import moe_config_kwargs

        model.update(ffn="moe", moe_every=g("decoder_sparse_step") if family == "qwen2_moe" else 1,
                     moe=moe_config_kwargs(_as_hf_config(hf, family)))
    return _validated(model)


def _as_hf_config(hf: dict, family: str):
    """The dict as the attribute object `moex.interop.layers.moe_config_kwargs` reads, defaults filled."""
    obj = type(_CLASS_NAMES[family], (SimpleNamespace,), {})(**{**_DEFAULTS[family], **hf})
    return obj


def _validated(model: dict) -> C.ModelConfig:
    cfg = C.from_dict({"model": model})
    C.validate(cfg)
    return cfg.model


def infer_family(m: C.ModelConfig) -> str:
    """The Hugging Face family whose layout computes what this moex model computes, or a clear error."""
    if m.ffn == "dense":
        if m.mlp_activation == "gelu_tanh" and m.pos_emb == "learned" and m.norm == "layernorm" and m.bias == "all":
            if m.n_kv_head in (0, m.n_head) and not m.qk_norm:
                return "gpt2"
        if (m.mlp_activation == "swiglu" and m.pos_emb == "rope" and m.norm == "rmsnorm" and m.bias == "none"
                and not m.qk_norm):
            return "llama"
        raise InteropError("a dense model maps to llama (swiglu, rope, rmsnorm, no biases) or gpt2 (gelu_tanh, "
                           "learned positions, layernorm, bias=all); this one is neither")
    e = m.moe
    why = []
    if m.ffn != "moe" or e.router != "topk" or e.activation != "swiglu":
        why.append(f"ffn={m.ffn}, router={e.router}, activation={e.activation} (need moe, topk, swiglu)")
    if e.capacity_factor is not None:
        why.append("a capacity factor (Hugging Face MoE blocks are dropless)")
    if m.pos_emb != "rope" or m.norm != "rmsnorm":
        why.append("learned positions or layernorm")
    if why:
        raise InteropError("no Hugging Face family computes this model: " + "; ".join(why))
    if e.num_shared_experts:
        if e.shared_expert_gate and e.num_shared_experts == 1 and not m.qk_norm and m.bias in ("qkv", "none"):
            return "qwen2_moe"
    elif m.moe_every == 1 and m.bias == "none":
        if m.qk_norm:
            return "olmoe"
        if e.normalize_gates:
            return "mixtral"
    raise InteropError("no Hugging Face family matches this MoE layout (mixtral: renormalised top-k; olmoe: QK-norm; "
                       "qwen2_moe: one gated shared expert)")


def to_hf_config(m: C.ModelConfig, family: str) -> dict:
    """config.json for `family` describing the moex model `m` (see `infer_family`)."""
    base = {"architectures": [ARCHITECTURES[family]], "model_type": family, "vocab_size": m.vocab_size,
            "tie_word_embeddings": m.tie_embeddings, "torch_dtype": "float32"}
    if family == "gpt2":
        return {**base, "n_embd": m.d_model, "n_layer": m.n_layer, "n_head": m.n_head, "n_positions": m.block_size,
                "n_inner": m.d_ff, "activation_function": "gelu_new", "layer_norm_epsilon": m.norm_eps,
                "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0}
    out = {**base, "hidden_size": m.d_model, "num_hidden_layers": m.n_layer, "num_attention_heads": m.n_head,
           "num_key_value_heads": m.n_kv_head or m.n_head, "max_position_embeddings": m.block_size,
           "rms_norm_eps": m.norm_eps, "rope_theta": m.rope_base,
           "rope_parameters": {"rope_type": "default", "rope_theta": m.rope_base}, "hidden_act": "silu",
           "intermediate_size": m.d_ff if family in ("llama", "qwen2_moe") else m.moe.d_expert,
           "attention_dropout": 0.0}
    if family == "llama":
        return {**out, "attention_bias": False, "mlp_bias": False}
    e = m.moe
    out["num_experts_per_tok"] = e.top_k
    if family == "mixtral":
        return {**out, "num_local_experts": e.num_experts, "sliding_window": None, "router_jitter_noise": 0.0}
    out.update(num_experts=e.num_experts, norm_topk_prob=e.normalize_gates)
    if family == "olmoe":
        return {**out, "clip_qkv": None}
    return {**out, "moe_intermediate_size": e.d_expert, "decoder_sparse_step": m.moe_every, "mlp_only_layers": [],
            "shared_expert_intermediate_size": e.d_shared_expert or e.d_expert, "qkv_bias": m.bias == "qkv",
            "use_sliding_window": False}
