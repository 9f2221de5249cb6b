"""Load a trained model from a run or checkpoint directory, on one process, without DeepSpeed."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from moex import config as C
from moex.checkpoint import format as fmt
from moex.errors import CheckpointError


@dataclass
class Loaded:
    cfg: C.Config
    model: torch.nn.Module
    run_dir: Path
    ckpt_dir: Path
    step: int


def load_config(ckpt: Path, meta: dict | None = None) -> C.Config:
    """The resolved config a checkpoint was trained with (from its metadata; no weights loaded)."""
    meta = meta or fmt.read_meta(ckpt)
    try:
        return C.from_saved(meta["config"])
    except C.ConfigError as e:
        raise CheckpointError(f"{ckpt}: its saved config does not fit this moex ({e})") from None


def load_model(path: str | Path, device="cpu", warn=None) -> Loaded:
    """A run dir (newest complete checkpoint) or a checkpoint dir -> model in eval mode with its config.

    `warn` hears when `latest` was unusable and an older complete checkpoint is used instead
    (default: printed to stderr)."""
    import sys

    from moex.models import GPT

    run_dir, ckpt = fmt.resolve(path, warn=warn or (lambda m: print(m, file=sys.stderr)))
    meta = fmt.read_meta(ckpt)
    cfg = load_config(ckpt, meta)
    cfg.parallel.ep_size = 1  # consolidated on one process
    model = GPT(cfg.model)
    state = fmt.load_model_state(ckpt)
    missing, unexpected = model.load_state_dict(state, strict=False)
    real_missing = [k for k in missing if not k.endswith("lm_head.weight")]  # tied to wte
    if real_missing or unexpected:
        raise CheckpointError(f"{ckpt}: checkpoint does not match its config (missing {real_missing}, "
                              f"unexpected {unexpected})")
    model.to(device).eval()
    return Loaded(cfg, model, run_dir, ckpt, int(meta["step"]))


def adopt_tokenizer(init_from: str, run_dir: Path) -> None:
    """A run initialised from another run's weights needs its token ids: copy its tokenizer (if this run has none)."""
    p = Path(init_from)
    if not p.is_dir() or (run_dir / "tokenizer").exists():
        return
    src_run, _ = fmt.resolve(p)
    if (src_run / "tokenizer").is_dir():
        import shutil

        shutil.copytree(src_run / "tokenizer", run_dir / "tokenizer")
