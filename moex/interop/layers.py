"""Weight mapping between moex MoE layers and the peers' MoE blocks (Hugging Face, DeepSpeed).

Shape key: E experts, D model dim, H hidden units per expert, Hs shared-expert hidden units.

Everything here works on state dicts *relative to one MoE block*, so whole-model
import/export reuses it with a key prefix per layer. moex's side (keys of a
:class:`moex.models.moe.MoELayer` with the ``topk`` router):

    router.gate.weight   (E, D)      experts.w1_EDH (E, D, H)   gate projection (SwiGLU) / fc
    experts.w3_EDH       (E, D, H)   up projection (SwiGLU only)
    experts.w2_EHD       (E, H, D)   down projection
    shared.mlp.fc.weight (Hs, D)     shared.mlp.up.weight (Hs, D)   shared.mlp.proj.weight (D, Hs)
    shared.gate.weight   (1, D)      Qwen2-MoE's sigmoid gate on the shared output

Families (``FAMILIES``), each block's keys as transformers 5 names them:

- ``mixtral``, ``olmoe``: ``gate.weight`` (E, D); ``experts.gate_up_proj`` (E, 2H, D), gate rows
  first; ``experts.down_proj`` (E, D, H). Checkpoints written by transformers 4 hold one
  module per expert instead (``experts.{e}.w1/w3/w2.weight`` for Mixtral,
  ``experts.{e}.gate_proj/up_proj/down_proj.weight`` for OLMoE/Qwen2-MoE); those load too.
- ``qwen2_moe``: as above plus ``shared_expert.{gate,up,down}_proj.weight`` and
  ``shared_expert_gate.weight``.
- ``switch``: ``router.classifier.weight`` (E, D); ``experts.expert_{e}.wi.weight`` (H, D),
  ``experts.expert_{e}.wo.weight`` (D, H); ReLU experts, top-1.
- ``deepspeed``: ``deepspeed.moe.layer.MoE`` whose expert is ``Sequential(Linear(D, H),
  act, Linear(H, D))`` without biases: ``deepspeed_moe.gate.wg.weight`` (E, D),
  ``deepspeed_moe.experts.deepspeed_experts.{e}.0.weight`` / ``.2.weight``.

:func:`moe_config_kwargs` maps a transformers config to the matching ``MoEConfig`` fields.
"""

from __future__ import annotations

import re

import torch
from torch import Tensor

__all__ = ["FAMILIES", "from_peer_state", "to_peer_state", "load_peer_block", "moe_config_kwargs"]

FAMILIES = ("mixtral", "olmoe", "qwen2_moe", "switch", "deepspeed")
_LEGACY_NAMES = {"mixtral": ("w1", "w3", "w2"), "olmoe": ("gate_proj", "up_proj", "down_proj"),
                 "qwen2_moe": ("gate_proj", "up_proj", "down_proj")}


def _check_family(family: str) -> None:
    if family not in FAMILIES:
        raise ValueError(f"unknown MoE family {family!r}; valid: {', '.join(FAMILIES)}")


def _num_experts(sd: dict, pattern: str) -> int:
    ids = {int(m.group(1)) for k in sd for m in [re.fullmatch(pattern, k)] if m}
    if not ids:
        raise KeyError(f"no expert weights matching {pattern!r} among {sorted(sd)[:8]}...")
    return max(ids) + 1


def _stack(sd: dict, fmt: str, n: int) -> Tensor:
    """Stack per-expert (out, in) Linear weights into (E, in, out)."""
    return torch.stack([sd[fmt.format(e)].t() for e in range(n)])


def from_peer_state(family: str, sd: dict[str, Tensor]) -> dict[str, Tensor]:
    """A peer MoE block's state dict -> the equivalent moex ``MoELayer`` state dict (new tensors)."""
    _check_family(family)
    out: dict[str, Tensor] = {}
    if family == "switch":
        n = _num_experts(sd, r"experts\.expert_(\d+)\.wi\.weight")
        if "router.classifier.bias" in sd:
            raise ValueError("switch: a router bias (router_bias=True) has no moex counterpart")
        out["router.gate.weight"] = sd["router.classifier.weight"].clone()
        out["experts.w1_EDH"] = _stack(sd, "experts.expert_{}.wi.weight", n)
        out["experts.w2_EHD"] = _stack(sd, "experts.expert_{}.wo.weight", n)
        return out
    if family == "deepspeed":
        pre = "deepspeed_moe.experts.deepspeed_experts.{}."
        n = _num_experts(sd, r"deepspeed_moe\.experts\.deepspeed_experts\.(\d+)\.0\.weight")
        if any(k.endswith(".bias") for k in sd):
            raise ValueError("deepspeed: expert or gate biases have no moex counterpart (use bias=False)")
        out["router.gate.weight"] = sd["deepspeed_moe.gate.wg.weight"].clone()
        out["experts.w1_EDH"] = _stack(sd, pre + "0.weight", n)
        out["experts.w2_EHD"] = _stack(sd, pre + "2.weight", n)
        return out
    out["router.gate.weight"] = sd["gate.weight"].clone()
    if "experts.gate_up_proj" in sd:  # transformers 5: stacked (E, 2H, D) and (E, D, H)
        gate_up = sd["experts.gate_up_proj"]
        H = gate_up.shape[1] // 2
        out["experts.w1_EDH"] = gate_up[:, :H].transpose(1, 2).contiguous()
        out["experts.w3_EDH"] = gate_up[:, H:].transpose(1, 2).contiguous()
        out["experts.w2_EHD"] = sd["experts.down_proj"].transpose(1, 2).contiguous()
    else:  # transformers 4 checkpoints: one Linear per expert
        g, u, d = _LEGACY_NAMES[family]
        n = _num_experts(sd, rf"experts\.(\d+)\.{g}\.weight")
        out["experts.w1_EDH"] = _stack(sd, "experts.{}." + g + ".weight", n)
        out["experts.w3_EDH"] = _stack(sd, "experts.{}." + u + ".weight", n)
        out["experts.w2_EHD"] = _stack(sd, "experts.{}." + d + ".weight", n)
    if family == "qwen2_moe":
        for ours, theirs in (("fc", "gate_proj"), ("up", "up_proj"), ("proj", "down_proj")):
            out[f"shared.mlp.{ours}.weight"] = sd[f"shared_expert.{theirs}.weight"].clone()
        out["shared.gate.weight"] = sd["shared_expert_gate.weight"].clone()
    return out


def to_peer_state(family: str, sd: dict[str, Tensor]) -> dict[str, Tensor]:
    """A moex ``MoELayer`` state dict -> the peer block's (transformers 5 layout for HF families)."""
    _check_family(family)
    w1, w2, w3 = sd["experts.w1_EDH"], sd["experts.w2_EHD"], sd.get("experts.w3_EDH")
    E = w1.shape[0]
    out: dict[str, Tensor] = {}
    if family in ("switch", "deepspeed"):
        if w3 is not None:
            raise ValueError(f"{family} experts are two-matrix MLPs; this layer has SwiGLU experts")
        fc, proj = ("experts.expert_{}.wi.weight", "experts.expert_{}.wo.weight") if family == "switch" else (
            "deepspeed_moe.experts.deepspeed_experts.{}.0.weight", "deepspeed_moe.experts.deepspeed_experts.{}.2.weight")
        out["router.classifier.weight" if family == "switch" else "deepspeed_moe.gate.wg.weight"] = \
            sd["router.gate.weight"].clone()
        for e in range(E):
            out[fc.format(e)] = w1[e].t().contiguous()
            out[proj.format(e)] = w2[e].t().contiguous()
        return out
    if w3 is None:
        raise ValueError(f"{family} experts are SwiGLU (three matrices); this layer's experts are not")
    out["gate.weight"] = sd["router.gate.weight"].clone()
    out["experts.gate_up_proj"] = torch.cat([w1, w3], dim=2).transpose(1, 2).contiguous()
    out["experts.down_proj"] = w2.transpose(1, 2).contiguous()
    has_shared = "shared.mlp.fc.weight" in sd
    if family == "qwen2_moe":
        if not has_shared or "shared.gate.weight" not in sd:
            raise ValueError("qwen2_moe needs shared experts with a sigmoid gate (num_shared_experts >= 1, "
                             "shared_expert_gate=true)")
        for ours, theirs in (("fc", "gate_proj"), ("up", "up_proj"), ("proj", "down_proj")):
            out[f"shared_expert.{theirs}.weight"] = sd[f"shared.mlp.{ours}.weight"].clone()
        out["shared_expert_gate.weight"] = sd["shared.gate.weight"].clone()
    elif has_shared:
        raise ValueError(f"{family} has no shared experts; this layer has some")
    return out


def load_peer_block(layer, family: str, block) -> None:
    """Copy a peer block's weights (an ``nn.Module``) into a moex ``MoELayer`` in place (strict)."""
    state = from_peer_state(family, block.state_dict())
    ours = layer.state_dict()
    for k, v in state.items():
        if k in ours and ours[k].shape != v.shape:
            raise ValueError(f"{k}: peer shape {tuple(v.shape)} != moex shape {tuple(ours[k].shape)}")
    layer.load_state_dict({k: v.to(ours[k].dtype) if k in ours else v for k, v in state.items()}, strict=True)


def moe_config_kwargs(hf_config) -> dict:
    """``MoEConfig`` fields that reproduce a transformers MoE config's sparse block (dropless,
    except Switch, whose ``expert_capacity`` is per sequence: pass the factor for your length)."""
    name = type(hf_config).__name__
    if name == "SwitchTransformersConfig":
        return dict(router="topk", num_experts=hf_config.num_experts, top_k=1, d_expert=hf_config.d_ff,
                    activation=_act(hf_config.dense_act_fn, gated=False), z_loss_coef=0.0, aux_loss_coef=0.0)
    if name not in ("MixtralConfig", "OlmoeConfig", "Qwen2MoeConfig"):
        raise ValueError(f"no MoE mapping for {name}; supported: Mixtral, OLMoE, Qwen2-MoE, Switch")
    E = hf_config.num_local_experts if name == "MixtralConfig" else hf_config.num_experts
    kw = dict(router="topk", num_experts=E, top_k=hf_config.num_experts_per_tok,
              activation=_act(hf_config.hidden_act, gated=True), aux_loss_coef=0.0, z_loss_coef=0.0,
              normalize_gates=True if name == "MixtralConfig" else bool(hf_config.norm_topk_prob))
    if name == "Qwen2MoeConfig":
        kw.update(d_expert=hf_config.moe_intermediate_size, num_shared_experts=1,
                  d_shared_expert=hf_config.shared_expert_intermediate_size, shared_expert_gate=True)
    else:
        kw.update(d_expert=hf_config.intermediate_size)
    return kw


def _act(hf_act: str, *, gated: bool) -> str:
    table = {("silu", True): "swiglu", ("swish", True): "swiglu", ("relu", False): "relu",
             ("gelu", False): "gelu"}
    if (hf_act, gated) not in table:
        raise ValueError(f"activation {hf_act!r} ({'gated' if gated else 'not gated'}) has no moex expert type")
    return table[(hf_act, gated)]
