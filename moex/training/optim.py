"""AdamW parameter groups, expert-parameter marking and the DeepSpeed config."""

from __future__ import annotations

import torch

from moex.config import Config, OptimConfig

EXPERT_PARAM_SUFFIXES = ("w1_EDH", "w2_EHD", "w3_EDH")


def expert_group_name(ep_size: int) -> str:
    return f"ep_size_{ep_size}"  # DeepSpeed's own naming for expert-data-parallel groups


def create_expert_groups(ep_size: int) -> None:
    """DeepSpeed's expert-parallel and expert-data-parallel process groups for `ep_size`."""
    from deepspeed.utils import groups

    if expert_group_name(ep_size) not in groups._get_expert_parallel_group_dict():
        groups._create_expert_and_data_parallel(ep_size)


def mark_expert_params(model: torch.nn.Module, ep_size: int) -> int:
    """Mark stacked expert weights the way DeepSpeed's MoE layer does, so the engine
    reduces their gradients over the expert-data-parallel group only. Returns the count."""
    n = 0
    for name, p in model.named_parameters():
        if name.endswith(EXPERT_PARAM_SUFFIXES):
            p.allreduce = False
            p.group_name = expert_group_name(ep_size)
            n += 1
    return n


def build_optimizer(model: torch.nn.Module, cfg: OptimConfig) -> torch.optim.Optimizer:
    """AdamW; weight decay on matrices only; expert params in their own MoE groups."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.dim() >= 2 else no_decay).append(p)
    groups = [
        {"params": decay, "weight_decay": cfg.weight_decay, "name": "decay"},
        {"params": no_decay, "weight_decay": 0.0, "name": "no_decay"},
    ]
    if any(getattr(p, "allreduce", True) is False for p in model.parameters()):
        from deepspeed.moe.utils import split_params_into_different_moe_groups_for_optimizer

        groups = split_params_into_different_moe_groups_for_optimizer(groups)
    groups = [g for g in groups if g["params"]]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps)


def deepspeed_config(cfg: Config, world_size: int) -> dict:
    tc = cfg.train
    return {
        "train_batch_size": tc.batch_size * tc.grad_accum * world_size,
        "train_micro_batch_size_per_gpu": tc.batch_size,
        "gradient_accumulation_steps": tc.grad_accum,
        "gradient_clipping": cfg.optim.grad_clip,
        "zero_optimization": {"stage": cfg.deepspeed.zero_stage},
        "zero_allow_untested_optimizer": True,
        "bf16": {"enabled": tc.precision == "bf16"},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
