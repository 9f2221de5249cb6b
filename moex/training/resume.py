"""What a resumed run keeps from its checkpoint and what it takes from the current config.

- The model must be the one the checkpoint holds: any change to a `model.*` key that
  shapes or defines the network is refused (before anything is written), naming the key.
  Keys that only steer computation (dropout, backends, aux-loss coefficients,
  capacity) may change.
- Optimisation settings take effect from the resumed step: `optim.*` (lr, min_lr,
  warmup, betas, eps, weight decay, schedule, grad clip) and `train.max_steps`. The
  optimizer's moments and step count come from the checkpoint; its hyperparameters and
  the LR schedule come from the config. Every changed setting is printed.
"""

from __future__ import annotations

from pathlib import Path

from moex import config as C
from moex.errors import ConfigError

# model.* keys that may change on resume: they do not change parameters or their meaning.
MUTABLE_MODEL_KEYS = {"dropout", "attn_backend", "init_std", "moe.gemm_backend", "moe.capacity_factor",
                      "moe.aux_loss_coef", "moe.z_loss_coef", "moe.bias_update_rate", "monet.uniformity_coef",
                      "monet.ambiguity_coef"}
# Keys that say where/how a run is driven, not what it computes: never worth a note.
_QUIET = {"train.resume", "train.progress", "train.run_name", "train.out_dir", "train.init_from", "train.threads"}
_HYPER = ("betas", "eps", "weight_decay")


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def check_model_unchanged(saved_cfg: dict, cfg: C.Config, ckpt: Path) -> None:
    """ConfigError naming every model key whose value differs from the checkpoint's."""
    saved = _flat(C.migrate_saved(saved_cfg).get("model", {}))  # a run from before model.monet/peer
    now = _flat(C.to_dict(cfg.model))
    diffs = []
    for key, value in now.items():
        if key not in saved or key in MUTABLE_MODEL_KEYS or saved[key] == value:
            continue  # (a key the checkpoint predates keeps its default meaning)
        if key == "vocab_size" and value == 0:
            continue  # 0 = taken from the tokenizer, as when the checkpoint was written
        diffs.append(f"model.{key}={saved[key]!r} but this config has {value!r}")
    if diffs:
        raise ConfigError(f"{ckpt} was trained with {'; '.join(diffs)}. A run resumes only with its own model: "
                          f"restore the value, or start over with --fresh (the old run is moved aside)")


def changed_settings(saved_cfg: dict, cfg: C.Config) -> list[str]:
    """`key old -> new` for every non-model setting that differs from the checkpoint's config."""
    saved, now = _flat(saved_cfg), _flat(C.to_dict(cfg))
    return [f"{k} {saved[k]!r} -> {v!r}".replace("'", "") for k, v in now.items()
            if k in saved and saved[k] != v and not k.startswith(("model.", "parallel.", "deepspeed.")) and k not in _QUIET]


def _groups(engine) -> list[dict]:
    return engine.optimizer.param_groups  # ZeRO's optimizer forwards to its inner optimizer's groups


def hyperparams(engine) -> list[dict]:
    """The freshly built optimizer's per-group hyperparameters (from the config), before a load replaces them."""
    return [{k: g[k] for k in _HYPER if k in g} for g in _groups(engine)]


def apply_schedule(engine, scheduler, fresh: list[dict], cfg: C.Config) -> None:
    """After loading a checkpoint: the config's hyperparameters and LR schedule, at the checkpoint's position."""
    groups = _groups(engine)
    if len(groups) == len(fresh):
        for g, h in zip(groups, fresh):
            g.update(h)
    if scheduler is None:
        return
    # LambdaLR: lr = base_lr * f(step), f = lr_at(step; cfg) / cfg.lr. The checkpoint's base_lrs
    # are its old lr; the config's lr and f (min_lr, warmup, max_steps) apply from here on.
    scheduler.base_lrs = [cfg.optim.lr for _ in scheduler.base_lrs]
    lrs = [base * fn(scheduler.last_epoch) for base, fn in zip(scheduler.base_lrs, scheduler.lr_lambdas)]
    for g, lr in zip(scheduler.optimizer.param_groups, lrs):
        g["lr"] = lr
    scheduler._last_lr = lrs
