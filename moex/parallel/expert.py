"""Expert parallelism: shard each MoE layer's experts over an expert-parallel group.

Shape key: E global experts, El = E / P local experts, P expert-parallel (EP)
group size, D model dim, H hidden units per expert.

``setup_expert_parallel(model, ep_size)`` turns a model built identically on
every rank (same seed) into its EP shard: rank r of the EP group keeps global
experts [r*El, (r+1)*El) and routes rows there with an all-to-all dispatcher
(moex.parallel.dispatch). The sharded model computes exactly what the 1-rank
model computes on the same global batch.

DeepSpeed only reduces expert gradients over the expert-data-parallel group
(and ZeRO only partitions expert parameter groups over it) when it finds a
``deepspeed.moe.layer.MoE`` module in the model. :class:`ShardedExperts` is
both moex's ``Experts`` and such a module (without DeepSpeed's capacity-padded
MoE machinery: its ``__init__`` is never called), so the engine takes its MoE
paths. Its expert weights contain "expert" in their state-dict keys, so
DeepSpeed's model file keeps only the dense parameters; the experts are saved
by moex.checkpoint.reshard as ``expert_shard_rank{r}.pt``.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from deepspeed.moe.layer import MoE as _DeepSpeedMoE
from torch import nn
from torch.distributed._functional_collectives import all_gather_single_autograd, wait_tensor

from moex.models.moe import Experts, MoELayer
from moex.parallel.dispatch import ExpertParallelDispatcher

__all__ = ["ShardedExperts", "setup_expert_parallel", "expert_layers", "ep_group", "install_exact_grad_clipping"]


def ep_group_name(ep_size: int) -> str:
    return f"ep_size_{ep_size}"  # DeepSpeed's naming of expert(-data)-parallel groups


def ep_group(ep_size: int):
    """(group, rank in group) of this rank's expert-parallel group; created on first use."""
    from deepspeed.utils import groups

    name = ep_group_name(ep_size)
    if name not in groups._get_expert_parallel_group_dict():
        groups._create_expert_and_data_parallel(ep_size)
    return groups._get_expert_parallel_group(name), groups._get_expert_parallel_rank(name)


class ShardedExperts(Experts, _DeepSpeedMoE):
    """This rank's El experts of a layer with E global experts (w1_EDH holds El rows).

    Also a DeepSpeed ``MoE`` module so the engine reduces its parameters over the
    expert-data-parallel group. Attributes DeepSpeed reads: ``num_experts``
    (global E), ``ep_size``, ``expert_group_name``, ``num_local_experts`` and
    ``set_deepspeed_parallelism()``. ``num_local_experts`` is 0 on purpose: it is
    the number of DeepSpeed per-expert checkpoint files to read/write, and moex
    writes its own expert shards instead (see moex.checkpoint.reshard).
    """

    def __init__(self, full: Experts, ep_rank: int, ep_size: int):
        nn.Module.__init__(self)  # not MoE.__init__: no gate, no capacity machinery
        E = full.num_experts
        El = E // ep_size
        self.global_experts, self.local_experts, self.expert_offset = E, El, ep_rank * El
        lo, hi = ep_rank * El, (ep_rank + 1) * El
        # Keep the Parameter objects (they may already carry DeepSpeed's MoE marks).
        self.w1_EDH, self.w2_EHD, self.w3_EDH = full.w1_EDH, full.w2_EHD, full.w3_EDH
        weights = [p for p in (self.w1_EDH, self.w2_EHD, self.w3_EDH) if p is not None]
        with torch.no_grad():
            for p in weights:
                p.data = p.data[lo:hi].clone()
        self.act_name, self.act = full.act_name, full.act
        self.ep_size, self.expert_group_name = ep_size, ep_group_name(ep_size)
        self.num_local_experts = 0  # DeepSpeed per-expert files: none (see class docstring)
        for p in weights:
            p.allreduce, p.group_name = False, self.expert_group_name

    @property
    def num_experts(self) -> int:
        return self.global_experts

    def set_deepspeed_parallelism(self, use_data_before_expert_parallel_: bool = False) -> None:
        ep_group(self.ep_size)  # groups exist already; called by the engine for every MoE module

    def forward(self, x_AD, counts_El, backend: str = "auto"):
        return Experts.forward(self, x_AD, counts_El, backend)


class _GatheredExperts:
    """What a router sees under EP: all E experts' encoder weights, gathered lazily.

    Only routers that read ``w1_EDH`` (MoE-X) pay for the all-gather; its backward
    is a reduce-scatter, so each rank's slice gets the gradient from every rank's
    tokens, as the expert GEMMs' gradients do.
    """

    def __init__(self, local: ShardedExperts, group):
        self._local, self._group = local, group

    @property
    def w1_EDH(self):
        return wait_tensor(all_gather_single_autograd(self._local.w1_EDH.contiguous(), 0, self._group))

    @property
    def num_experts(self) -> int:
        return self._local.global_experts


def _router_sees_all_experts(group):
    def hook(router, args):
        x_TD, experts = args
        return x_TD, _GatheredExperts(experts, group)

    return hook


def expert_layers(model: nn.Module) -> list[MoELayer]:
    return [m for m in model.modules() if isinstance(m, MoELayer)]


def _reject_data_parallel_only(model: nn.Module) -> None:
    from moex.models.monet import MonetLayer
    from moex.models.peer import PEERLayer

    bad = sorted({type(m).__name__ for m in model.modules() if isinstance(m, (MonetLayer, PEERLayer))})
    if bad:
        raise ValueError(
            f"parallel.ep_size > 1 is not supported for {', '.join(bad)} (model.ffn monet/peer): their "
            "product-key experts are tiny and shared by every token, so they train data-parallel only; "
            "set parallel.ep_size=1"
        )


def setup_expert_parallel(model: nn.Module, ep_size: int) -> nn.Module:
    """Shard every MoELayer's experts over the EP group of size `ep_size` (in place).

    Needs torch.distributed initialised through DeepSpeed (moex.training.distributed.init)
    and the full, identically initialised model on every rank. Returns `model`.
    """
    if ep_size == 1:
        return model
    _reject_data_parallel_only(model)
    layers = expert_layers(model)
    if not layers:
        raise ValueError("parallel.ep_size > 1 needs MoE layers (model.ffn=moe)")
    world = dist.get_world_size()
    if world % ep_size:
        raise ValueError(f"world size {world} is not divisible by parallel.ep_size={ep_size}")
    group, rank = ep_group(ep_size)
    for layer in layers:
        E = layer.cfg.num_experts
        if E % ep_size:
            raise ValueError(f"num_experts={E} is not divisible by parallel.ep_size={ep_size}")
        if isinstance(layer.experts, ShardedExperts):
            raise ValueError("setup_expert_parallel was already applied to this model")
        layer.experts = ShardedExperts(layer.experts, rank, ep_size)
        layer.dispatcher = ExpertParallelDispatcher(group, E)
        layer.router.register_forward_pre_hook(_router_sees_all_experts(group))
    return model


def _clip_grad_norm_ep(params, max_norm: float, group) -> torch.Tensor:
    """Clip by the norm of the whole model's gradient: dense grads are replicated,
    expert grads differ across the EP group, so only their squares are summed over it."""
    from deepspeed.moe.utils import is_moe_param

    grads = [p for p in params if p.grad is not None]
    dense_sq = sum((p.grad.detach().float().square().sum() for p in grads if not is_moe_param(p)), torch.zeros(()))
    expert_sq = sum((p.grad.detach().float().square().sum() for p in grads if is_moe_param(p)), torch.zeros(()))
    expert_sq = expert_sq.to(grads[0].device)
    dist.all_reduce(expert_sq, group=group)
    total = (dense_sq.to(expert_sq.device) + expert_sq).sqrt()
    coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)  # DeepSpeed's formula
    for p in grads:
        p.grad.detach().mul_(coef.to(p.grad.dtype))
    return total


def install_exact_grad_clipping(engine, ep_size: int) -> None:
    """Make DeepSpeed's fp32 no-ZeRO gradient clipping use the true global norm under EP.

    DeepSpeed (0.19) clips there with the *mean over ranks* of each rank's local
    norm, which differs from the global norm once expert gradients differ between
    ranks. ZeRO-1/2 (and bf16) compute the global norm correctly and are left alone.
    """
    if ep_size == 1:
        return
    group, _ = ep_group(ep_size)

    def clip_fp32_gradients():
        return _clip_grad_norm_ep(engine.module.parameters(), engine.gradient_clipping(), group)

    engine.clip_fp32_gradients = clip_fp32_gradients
