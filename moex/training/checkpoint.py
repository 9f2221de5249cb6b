"""Atomic checkpoints on top of DeepSpeed's per-rank checkpoint files.

Layout of a run directory:
    run/checkpoints/step-0000200/   DeepSpeed files (model, optimizer per rank) + trainer state
    run/checkpoints/latest          name of the newest complete checkpoint

A checkpoint is written to `tmp-step-N/`, then renamed into place; `latest` is
replaced atomically after that. A kill at any moment leaves the previous
checkpoint and `latest` intact (a stray tmp-* directory is removed next time).
"""

from __future__ import annotations

import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch

LATEST = "latest"
WEIGHTS_ONLY = "WEIGHTS_ONLY"  # marker file of a checkpoint written by save_weights


def tag_for(step: int) -> str:
    return f"step-{step:07d}"


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def rng_state() -> dict:
    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])


def save(engine, ckpt_dir: Path, step: int, client_state: dict, *, rank: int, barrier, keep: int = 2) -> Path:
    """Write checkpoint `step` atomically; keep the newest `keep` checkpoints."""
    ckpt_dir = Path(ckpt_dir)
    tag, tmp_tag = tag_for(step), "tmp-" + tag_for(step)
    if rank == 0:
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(ckpt_dir / tmp_tag, ignore_errors=True)
    barrier()
    engine.save_checkpoint(str(ckpt_dir), tag=tmp_tag, client_state=client_state, save_latest=False)
    # MoE models: expert-parallel shards and layout-independent Adam state (moex.parallel.reshard).
    from moex.parallel import reshard

    reshard.save(engine, ckpt_dir / tmp_tag, rank=rank)
    barrier()
    final = ckpt_dir / tag
    if rank == 0:
        if final.exists():  # re-saving the same step (e.g. after a resume): swap the old one out
            shutil.rmtree(final)
        os.rename(ckpt_dir / tmp_tag, final)
        _write_atomic(ckpt_dir / LATEST, tag)
        _prune(ckpt_dir, keep)
    barrier()
    return final


def save_weights(ckpt_dir: Path, step: int, module_state: dict, client_state: dict) -> Path:
    """A weights-only checkpoint (no optimizer, no DeepSpeed engine), e.g. an imported model.

    `load_model_state` / `load_client_state` read it like a trained one, so `moex eval`,
    `interpret`, `upcycle` and `train.init_from` take it; it cannot be resumed (no
    optimizer state: `is_weights_only` says so). Written atomically.
    """
    ckpt_dir = Path(ckpt_dir)
    tag, tmp = tag_for(step), ckpt_dir / ("tmp-" + tag_for(step))
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    torch.save({"module": module_state, **client_state, "step": step},
               tmp / "mp_rank_00_model_states.pt")
    (tmp / WEIGHTS_ONLY).write_text("no optimizer state: initialise a new run from it with train.init_from\n")
    final = ckpt_dir / tag
    if final.exists():
        shutil.rmtree(final)
    os.rename(tmp, final)
    _write_atomic(ckpt_dir / LATEST, tag)
    return final


def is_weights_only(ckpt: Path) -> bool:
    return (Path(ckpt) / WEIGHTS_ONLY).exists()


def _prune(ckpt_dir: Path, keep: int) -> None:
    tags = sorted(p for p in ckpt_dir.glob("step-*") if p.is_dir())
    for old in tags[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    for stray in ckpt_dir.glob("tmp-step-*"):
        shutil.rmtree(stray, ignore_errors=True)


def latest_tag(ckpt_dir: Path) -> str | None:
    """Name of the newest complete checkpoint, or None."""
    f = Path(ckpt_dir) / LATEST
    if not f.exists():
        return None
    tag = f.read_text().strip()
    return tag if (Path(ckpt_dir) / tag).is_dir() else None


def resolve(path: str | Path) -> tuple[Path, Path]:
    """A run directory or a checkpoint directory -> (run_dir, checkpoint_dir)."""
    p = Path(path)
    if (p / "checkpoints").is_dir():
        tag = latest_tag(p / "checkpoints")
        if tag is None:
            raise FileNotFoundError(f"{p}: run directory has no complete checkpoint")
        return p, p / "checkpoints" / tag
    if p.is_dir() and p.parent.name == "checkpoints":
        return p.parent.parent, p
    raise FileNotFoundError(f"{p}: neither a run directory (with checkpoints/) nor a checkpoint directory")


def load_model_state(ckpt: Path) -> dict:
    """The model's full state dict from a checkpoint, without DeepSpeed (single process).

    Expert-parallel checkpoints hold each rank's local experts in their own files;
    they are concatenated back along the expert dimension here.
    """
    ckpt = Path(ckpt)
    files = sorted(ckpt.glob("mp_rank_*_model_states.pt"))
    if not files:
        raise FileNotFoundError(f"{ckpt}: no model states file (mp_rank_*_model_states.pt)")
    state = torch.load(files[0], map_location="cpu", weights_only=False)
    module = state["module"]
    shards = sorted(ckpt.glob("expert_shard_rank*.pt"))
    if shards:
        from moex.parallel.reshard import merge_expert_shards

        module = merge_expert_shards(module, [torch.load(s, map_location="cpu") for s in shards])
    return module


def load_client_state(ckpt: Path) -> dict:
    files = sorted(Path(ckpt).glob("mp_rank_*_model_states.pt"))
    state = torch.load(files[0], map_location="cpu", weights_only=False)
    return {k: v for k, v in state.items() if k not in ("module", "optimizer", "lr_scheduler")}
