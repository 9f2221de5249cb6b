"""Load a trained model from a run or checkpoint directory, on one process, without DeepSpeed."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from moex import config as C
from moex.training import checkpoint


@dataclass
class Loaded:
    cfg: C.Config
    model: torch.nn.Module
    run_dir: Path
    ckpt_dir: Path
    step: int


def load_model(path: str | Path, device="cpu") -> Loaded:
    """A run dir (newest checkpoint) or a checkpoint dir -> model in eval mode with its config."""
    from moex.models import GPT

    run_dir, ckpt = checkpoint.resolve(path)
    client = checkpoint.load_client_state(ckpt)
    cfg = C.from_dict(client["config"])
    cfg.parallel.ep_size = 1  # consolidated on one process
    model = GPT(cfg.model)
    state = checkpoint.load_model_state(ckpt)
    missing, unexpected = model.load_state_dict(state, strict=False)
    real_missing = [k for k in missing if not k.endswith("lm_head.weight")]  # tied to wte
    if real_missing or unexpected:
        raise RuntimeError(f"{ckpt}: checkpoint does not match its config (missing {real_missing}, unexpected {unexpected})")
    model.to(device).eval()
    return Loaded(cfg, model, run_dir, ckpt, client["step"])
