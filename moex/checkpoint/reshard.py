"""Expert-parallel checkpoints: per-rank expert shards and layout-independent resume.

Shape key: E global experts, El experts on one EP rank, D model dim, H hidden.

With ep_size > 1, DeepSpeed's model file (mp_rank_00_model_states.pt) holds the
dense parameters only (see moex.parallel.expert). Each EP rank (its
expert-data-parallel rank 0) adds ``expert_shard_rank{r}.pt``:

    {"ep_rank", "ep_size", "offset": {key: first global expert}, "num_experts": {key: E},
     "state": {key: local weight [El, ...]}, "optim": {key: {"exp_avg", "exp_avg_sq"}}}

Every MoE checkpoint also gets ``moex_optim_portable.pt`` (rank 0): Adam moments
of every parameter not in a shard, keyed by name, plus the Adam step. Together
they make a checkpoint readable under any (ep_size, world size, ZeRO stage):
:func:`resume` uses DeepSpeed's own loader when the layout is unchanged and
otherwise rebuilds weights, Adam moments, step and LR schedule by parameter name.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed as dist

from moex.checkpoint.format import SHARD, merge_expert_shards, read_expert_shards, torch_load
from moex.errors import CheckpointError

PORTABLE = "moex_optim_portable.pt"
ADAM_KEYS = ("exp_avg", "exp_avg_sq")

__all__ = ["slice_experts", "save", "resume"]


def _sharded(model) -> dict:
    """{param name: ShardedExperts module} for every expert-parallel weight in `model`."""
    from moex.parallel.expert import ShardedExperts

    out = {}
    for mname, m in model.named_modules():
        if isinstance(m, ShardedExperts):
            for pname, _ in m.named_parameters(recurse=False):
                out[f"{mname}.{pname}"] = m
    return out


def slice_experts(full: dict, model) -> dict:
    """Cut full-expert tensors in `full` down to this rank's experts (keys of sharded params only)."""
    out = dict(full)
    for key, m in _sharded(model).items():
        if key in out:
            out[key] = out[key][m.expert_offset : m.expert_offset + m.local_experts]
    return out


# ---------------------------------------------------------------- Adam state, any DeepSpeed stage
def _zero(engine) -> bool:
    return bool(engine.zero_optimization())


def _partitioned(engine) -> bool:
    """True when DeepSpeed keeps fp32 master weights + Adam state in flat partitions (ZeRO-1/2)."""
    return not isinstance(engine.optimizer, torch.optim.Optimizer)


def _portable(engine) -> bool:
    """Adam state readable by parameter name: torch's optimizer (no ZeRO, fp32) or ZeRO-1/2.
    (DeepSpeed's bf16 optimizer without ZeRO is not covered.)"""
    from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer

    return isinstance(engine.optimizer, (torch.optim.Optimizer, DeepSpeedZeroOptimizer))


def _adam_get(engine, p) -> dict | None:
    """Full-shape Adam moments of `p` (collective over p's data-parallel group when partitioned)."""
    if _partitioned(engine):
        from deepspeed.utils import safe_get_full_optimizer_state

        if not engine.optimizer.optimizer.state:  # no step taken yet
            return None
        if hasattr(engine.optimizer, "_lazy_init_hp_params_optimizer_state"):
            # (Re)link each param to its Adam fragments: DeepSpeed may have linked them
            # before the first step created the state, leaving the links empty.
            engine.optimizer._hp_optimizer_states_linked = False
            engine.optimizer._lazy_init_hp_params_optimizer_state()
        return {k: safe_get_full_optimizer_state(p, k).clone() for k in ADAM_KEYS}
    st = engine.optimizer.state.get(p)
    return {k: st[k].clone() for k in ADAM_KEYS} if st else None


def _adam_step(engine) -> float:
    opt = engine.optimizer.optimizer if _partitioned(engine) else engine.optimizer
    for st in opt.state.values():
        return float(st["step"])
    return 0.0


def _adam_set(engine, named: dict, moments: dict, step: float) -> None:
    """Install Adam moments (full-shape, by parameter name) and the step counter."""
    if _partitioned(engine):
        from deepspeed.utils import safe_set_full_optimizer_state

        if not _zero(engine):
            raise NotImplementedError("resuming under another parallel layout is implemented for fp32 "
                                      "(ZeRO 0/1/2) runs; bf16 needs the layout it was saved with")

        zo = engine.optimizer
        for flat in zo.single_partition_of_fp32_groups:  # the flat fp32 groups ZeRO steps on
            zo.optimizer.state[flat] = {"step": torch.tensor(step), **{k: torch.zeros_like(flat) for k in ADAM_KEYS}}
        zo._hp_optimizer_states_linked = False
        zo._lazy_init_hp_params_optimizer_state()
        for name, p in named.items():
            for k in ADAM_KEYS:
                safe_set_full_optimizer_state(p, moments[name][k].to(p.device), k)
        return
    for name, p in named.items():
        engine.optimizer.state[p] = {"step": torch.tensor(step), **{k: moments[name][k].to(p.device).clone() for k in ADAM_KEYS}}


# ---------------------------------------------------------------- save
def save(engine, ckpt: Path, *, rank: int) -> None:
    """Write expert shards and the portable Adam state into checkpoint dir `ckpt` (all ranks call)."""
    from moex.parallel.expert import expert_layers

    model = engine.module
    if not expert_layers(model):
        return
    sharded = _sharded(model)
    named = dict(model.named_parameters())
    portable = _portable(engine)
    # (collective under ZeRO: every rank walks the parameters in the same order)
    moments = {n: _adam_get(engine, p) if portable else None for n, p in named.items()}
    if sharded:
        from deepspeed.utils import groups

        m0 = next(iter(sharded.values()))
        if groups._get_expert_data_parallel_rank(m0.expert_group_name) == 0:
            shard = {"ep_rank": m0.expert_offset // m0.local_experts, "ep_size": m0.ep_size, "offset": {},
                     "num_experts": {}, "state": {}, "optim": {}}
            for key, m in sharded.items():
                shard["offset"][key], shard["num_experts"][key] = m.expert_offset, m.global_experts
                shard["state"][key] = named[key].detach().clone()
                shard["optim"][key] = moments[key]
            torch.save(shard, Path(ckpt) / SHARD.format(shard["ep_rank"]))
    if rank == 0 and portable:
        dense = {n: v for n, v in moments.items() if n not in sharded}
        torch.save({"step": _adam_step(engine), "optim": dense}, Path(ckpt) / PORTABLE)


# ---------------------------------------------------------------- resume
def _layout(cfg, world: int) -> tuple:
    return (cfg["parallel"]["ep_size"], world, cfg["deepspeed"]["zero_stage"])


def resume(engine, ckpt_dir: Path, tag: str, cfg, world: int) -> dict:
    """Load checkpoint `tag` into `engine` under the current layout; returns the client state."""
    from moex import config as C
    from moex.checkpoint.format import load_client_state

    ckpt = Path(ckpt_dir) / tag
    client = load_client_state(ckpt)
    model = engine.module
    sharded = _sharded(model)
    saved_layout, layout = _layout(client["config"], client["world_size"]), _layout(C.to_dict(cfg), world)
    if saved_layout != layout and not (ckpt / PORTABLE).exists():
        if saved_layout[0] != layout[0] or sharded or list(ckpt.glob("expert_shard_rank*.pt")):
            raise CheckpointError(f"{ckpt} was saved with (ep_size, world, zero_stage)={saved_layout} and has no "
                               f"{PORTABLE} (a bf16 run without ZeRO); resume it with that layout, not {layout}")
        saved_layout = layout  # a dense model: DeepSpeed's loader decides, as without moex
    if saved_layout == layout:
        # DeepSpeed restores dense weights, optimizer and schedule; its model file lacks the experts.
        _, client = engine.load_checkpoint(str(ckpt_dir), tag=tag, load_module_strict=not sharded)
        if sharded:
            own = _own_shard(ckpt, model)
            with torch.no_grad():
                for key, p in model.named_parameters():
                    if key in sharded:
                        p.copy_(own[key])
        return client
    return _resume_resharded(engine, ckpt, client)


def _own_shard(ckpt: Path, model) -> dict:
    shards = read_expert_shards(ckpt)
    return slice_experts(merge_expert_shards({}, shards), model)


def _resume_resharded(engine, ckpt: Path, client: dict) -> dict:
    """A checkpoint from another (ep_size, world, ZeRO stage): rebuild everything by parameter name."""
    from moex.checkpoint.format import load_model_state

    model = engine.module
    full = load_model_state(ckpt)  # dense + merged experts
    state = slice_experts(full, model)
    named = dict(model.named_parameters())
    with torch.no_grad():
        for name, p in named.items():
            p.copy_(state[name])
    if _partitioned(engine):
        engine.optimizer.refresh_fp32_params()  # fp32 master partitions <- the weights just loaded
    portable = torch_load(ckpt / PORTABLE)
    moments = dict(portable["optim"])
    shards = read_expert_shards(ckpt)
    for key in {k for s in shards for k in s["optim"]}:
        parts = sorted((s["offset"][key], s["optim"][key]) for s in shards if key in s["optim"])
        moments[key] = None if parts[0][1] is None else {k: torch.cat([m[k] for _, m in parts]) for k in ADAM_KEYS}
    if all(v is not None for v in moments.values()):  # None: saved before the first optimizer step
        moments = {n: {k: slice_experts({n: m[k]}, model)[n] for k in ADAM_KEYS} for n, m in moments.items()}
        _adam_set(engine, named, moments, portable["step"])
    files = sorted(ckpt.glob("mp_rank_*_model_states.pt"))
    ds_state = torch_load(files[0], weights_only=False)
    sched = engine.lr_scheduler
    if sched is not None and ds_state.get("lr_scheduler") is not None:
        # Param groups differ between layouts (EP splits out expert groups), so restore the
        # schedule's position and recompute every group's lr (LambdaLR: base_lr * f(step)).
        saved = ds_state["lr_scheduler"]
        sched.last_epoch, sched._step_count = saved["last_epoch"], saved["_step_count"]
        lrs = [base * fn(sched.last_epoch) for base, fn in zip(sched.base_lrs, sched.lr_lambdas)]
        for group, lr in zip(sched.optimizer.param_groups, lrs):
            group["lr"] = lr
        sched._last_lr = lrs
    engine.global_steps, engine.global_samples = ds_state["global_steps"], ds_state["global_samples"]
    if dist.is_initialized():
        dist.barrier()
    return client
