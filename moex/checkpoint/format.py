"""The checkpoint format: atomic save, a metadata side file, ordering, `latest` with fallback, pruning.

Layout of a run directory:
    run/checkpoints/step-0000200/   DeepSpeed files (model, optimizer per rank), moex's expert
                                    shards (moex.checkpoint.reshard) and meta.json
    run/checkpoints/latest          name of the newest complete checkpoint

A checkpoint is written to `tmp-step-N/`; rank 0 then writes `meta.json` (step, config,
config hash, world size and every file's size), renames the directory into place and
replaces `latest` atomically. A kill at any moment leaves the previous checkpoint and
`latest` intact. A checkpoint is *complete* when `meta.json` exists and every file it lists
has its recorded size; checkpoints written before the side file existed (no meta.json)
are complete when their model-states file is present, and their metadata is read from it.

Checkpoints are ordered by the step in their metadata. When `latest` names a missing or
incomplete checkpoint, the newest complete one is used instead, and the caller is told.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
import time
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch

from moex.errors import CheckpointError, storage_error

LATEST = "latest"
META = "meta.json"
MODEL_STATES = "mp_rank_00_model_states.pt"
SHARD = "expert_shard_rank{}.pt"  # per-EP-rank experts (moex.checkpoint.reshard)
SHARD_GLOB = "expert_shard_rank*.pt"
WEIGHTS_ONLY = "WEIGHTS_ONLY"  # marker file of a checkpoint written by save_weights
FORMAT_VERSION = 1
_TAG = re.compile(r"^step-(\d+)$")

Warn = Optional[Callable[[str], None]]


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


def config_hash(config: dict) -> str:
    return hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()[:16]


# ---------------------------------------------------------------- metadata
def write_meta(ckpt: Path, client_state: dict, **extra) -> dict:
    """Write meta.json into checkpoint directory `ckpt`: client metadata + the size of every file."""
    ckpt = Path(ckpt)
    files = {str(p.relative_to(ckpt)): p.stat().st_size for p in sorted(ckpt.rglob("*")) if p.is_file() and p.name != META}
    config = client_state.get("config", {})
    meta = {"format": FORMAT_VERSION, "step": int(client_state["step"]), "world_size": client_state.get("world_size", 1),
            "config": config, "config_hash": config_hash(config), "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            **extra, "files": files}
    _write_atomic(ckpt / META, json.dumps(meta, indent=1))
    return meta


def _states_file(ckpt: Path) -> Path:
    files = sorted(Path(ckpt).glob("mp_rank_*_model_states.pt"))
    if not files:
        raise CheckpointError(f"{ckpt}: no model states file (mp_rank_*_model_states.pt)")
    return files[0]


def torch_load(path: Path, **kw):
    """torch.load, with a truncated or garbage file reported as a CheckpointError naming it."""
    try:
        return torch.load(path, map_location="cpu", **kw)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: missing") from None
    except Exception as e:  # zip/unpickling errors: the file is damaged
        cause = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise CheckpointError(f"{path}: corrupt or truncated checkpoint file ({cause})") from e


def read_meta(ckpt: Path) -> dict:
    """Client metadata (step, config, world_size, …) without loading weights.

    Checkpoints from before the side file: read from the model-states file instead."""
    ckpt = Path(ckpt)
    f = ckpt / META
    if f.exists():
        try:
            return json.loads(f.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise CheckpointError(f"{f}: corrupt metadata ({e})") from None
    state = torch_load(_states_file(ckpt), weights_only=False)
    return {k: v for k, v in state.items() if k not in ("module", "optimizer", "lr_scheduler", "rng")}


def load_client_state(ckpt: Path) -> dict:
    """The full client state saved with the engine (includes per-rank RNG states): loads the states file."""
    state = torch_load(_states_file(ckpt), weights_only=False)
    return {k: v for k, v in state.items() if k not in ("module", "optimizer", "lr_scheduler")}


def step_of(ckpt: Path) -> int | None:
    """A checkpoint's step: from meta.json, else (old format) from its name."""
    ckpt = Path(ckpt)
    try:
        return int(json.loads((ckpt / META).read_text())["step"])
    except (OSError, ValueError, KeyError, TypeError):
        m = _TAG.match(ckpt.name)
        return int(m.group(1)) if m else None


def incomplete_reason(ckpt: Path) -> str | None:
    """Why `ckpt` is not a complete checkpoint (None when it is)."""
    ckpt = Path(ckpt)
    if not ckpt.is_dir():
        return "missing"
    f = ckpt / META
    if f.exists():
        try:
            files = json.loads(f.read_text())["files"]
        except (OSError, ValueError, KeyError, TypeError):
            return f"corrupt {META}"
        for name, size in files.items():
            p = ckpt / name
            if not p.exists():
                return f"{name} is missing"
            if p.stat().st_size != size:
                return f"{name} is truncated ({p.stat().st_size} of {size} bytes)"
        return None
    states = list(ckpt.glob("mp_rank_*_model_states.pt"))  # old format: no side file
    if not states or states[0].stat().st_size == 0:
        return "no model states file"
    return None


def list_checkpoints(ckpt_dir: Path) -> list[Path]:
    """Complete checkpoints under `ckpt_dir`, oldest first (by step)."""
    found = []
    for p in Path(ckpt_dir).glob("step-*"):
        step = step_of(p)
        if p.is_dir() and step is not None and incomplete_reason(p) is None:
            found.append((step, p))
    return [p for _, p in sorted(found)]


def latest(ckpt_dir: Path, warn: Warn = None) -> Path | None:
    """The checkpoint `latest` names when complete; else the newest complete one (telling `warn` why)."""
    ckpt_dir = Path(ckpt_dir)
    f = ckpt_dir / LATEST
    named = None
    if f.exists():
        try:
            named = f.read_text().strip()
        except (OSError, UnicodeDecodeError):
            named = None
        if named and (ckpt_dir / named).is_dir() and "/" not in named and incomplete_reason(ckpt_dir / named) is None:
            return ckpt_dir / named
    ok = list_checkpoints(ckpt_dir)
    if ok and warn is not None:
        why = (f"{f} is missing" if not f.exists() else f"{f} is unreadable" if not named else
               f"{f} names {named}, which is {incomplete_reason(ckpt_dir / named) or 'not a checkpoint'}")
        warn(f"warning: {why}; using the newest complete checkpoint, {ok[-1]}")
    return ok[-1] if ok else None


def latest_tag(ckpt_dir: Path, warn: Warn = None) -> str | None:
    """Name of the newest complete checkpoint (see `latest`), or None."""
    p = latest(ckpt_dir, warn)
    return p.name if p is not None else None


def resolve(path: str | Path, warn: Warn = None) -> tuple[Path, Path]:
    """A run directory or a checkpoint directory -> (run_dir, checkpoint_dir)."""
    p = Path(path)
    if (p / "checkpoints").is_dir():
        ckpt = latest(p / "checkpoints", warn)
        if ckpt is None:
            raise CheckpointError(f"{p}: run directory has no complete checkpoint")
        return p, ckpt
    if p.is_dir() and p.parent.name == "checkpoints":
        why = incomplete_reason(p)
        if why is not None:
            raise CheckpointError(f"{p}: incomplete checkpoint ({why})")
        return p.parent.parent, p
    if not p.exists():
        raise CheckpointError(f"{p}: no such run or checkpoint directory")
    raise CheckpointError(f"{p}: neither a run directory (with checkpoints/) nor a checkpoint directory")


# ---------------------------------------------------------------- writing
def save(engine, ckpt_dir: Path, step: int, client_state: dict, *, rank: int, barrier, keep: int = 2,
         extra_writer=None) -> Path:
    """Write checkpoint `step` atomically, then keep the newest `keep` (0 = all).

    `extra_writer(engine, tmp_dir, rank=rank)` adds moex's own files (expert shards,
    portable Adam state) before the metadata is written. A full or read-only disk is
    reported as a StorageError naming the checkpoint; the partial directory is removed.
    """
    ckpt_dir = Path(ckpt_dir)
    tag, tmp = tag_for(step), ckpt_dir / ("tmp-" + tag_for(step))
    try:
        if rank == 0:
            ckpt_dir.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(tmp, ignore_errors=True)
        barrier()
        engine.save_checkpoint(str(ckpt_dir), tag=tmp.name, client_state=client_state, save_latest=False)
        if extra_writer is not None:
            extra_writer(engine, tmp, rank=rank)
        barrier()
        if rank == 0:
            write_meta(tmp, client_state)
            _install(ckpt_dir, tmp, tag)
            prune(ckpt_dir, keep)
    except BaseException as e:
        # (asked before the partial directory is removed: removing it frees the space again)
        named = storage_error(tmp, e, "write checkpoint") if isinstance(e, Exception) else None
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        if named is not None:
            raise named from e
        raise
    barrier()
    return ckpt_dir / tag


def _install(ckpt_dir: Path, tmp: Path, tag: str) -> None:
    """Rename the finished tmp dir into place and point `latest` at it."""
    final = ckpt_dir / tag
    if final.exists():  # re-saving the same step (e.g. after a resume): swap the old one out
        old = ckpt_dir / ("old-" + tag)
        shutil.rmtree(old, ignore_errors=True)
        os.rename(final, old)
        os.rename(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(tmp, final)
    _write_atomic(ckpt_dir / LATEST, tag)


def save_weights(ckpt_dir: Path, step: int, module_state: dict, client_state: dict) -> Path:
    """A weights-only checkpoint (no optimizer, no DeepSpeed engine), e.g. an imported model.

    `load_model_state` / `read_meta` read it like a trained one, so `moex eval`,
    `interpret`, `upcycle` and `train.init_from` take it; it cannot be resumed (no
    optimizer state: `is_weights_only` says so). Written atomically.
    """
    ckpt_dir = Path(ckpt_dir)
    tag, tmp = tag_for(step), ckpt_dir / ("tmp-" + tag_for(step))
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    client = {**client_state, "step": step}
    torch.save({"module": module_state, **client}, tmp / MODEL_STATES)
    (tmp / WEIGHTS_ONLY).write_text("no optimizer state: initialise a new run from it with train.init_from\n")
    write_meta(tmp, client, weights_only=True)
    _install(ckpt_dir, tmp, tag)
    return ckpt_dir / tag


def is_weights_only(ckpt: Path) -> bool:
    return (Path(ckpt) / WEIGHTS_ONLY).exists()


def prune(ckpt_dir: Path, keep: int) -> None:
    """Delete all but the newest `keep` complete checkpoints (by step; 0 = keep all) and stray tmp dirs.

    Never deletes the checkpoint `latest` names, nor an incomplete one (there is nothing
    newer to lose, and it may be inspected)."""
    ckpt_dir = Path(ckpt_dir)
    named = (ckpt_dir / LATEST).read_text().strip() if (ckpt_dir / LATEST).exists() else None
    complete = list_checkpoints(ckpt_dir)
    for old in complete[:-keep] if keep > 0 else []:
        if old.name != named:
            shutil.rmtree(old, ignore_errors=True)
    for stray in [*ckpt_dir.glob("tmp-step-*"), *ckpt_dir.glob("old-step-*")]:
        shutil.rmtree(stray, ignore_errors=True)


# ---------------------------------------------------------------- reading weights
def load_model_state(ckpt: Path) -> dict:
    """The model's full state dict from a checkpoint, without DeepSpeed (single process).

    Expert-parallel checkpoints hold each rank's local experts in their own files;
    they are concatenated back along the expert dimension here.
    """
    ckpt = Path(ckpt)
    module = torch_load(_states_file(ckpt), weights_only=False)["module"]
    shards = read_expert_shards(ckpt)
    return merge_expert_shards(module, shards) if shards else module


def read_expert_shards(ckpt: Path) -> list[dict]:
    """Every `expert_shard_rank*.pt` of a checkpoint (see moex.checkpoint.reshard for their layout)."""
    return [torch_load(f) for f in sorted(Path(ckpt).glob(SHARD_GLOB))]


def merge_expert_shards(module_state: dict, shards: list[dict]) -> dict:
    """Dense state + expert shards -> the full (ep_size 1) state dict; checks every expert is present once."""
    merged = dict(module_state)
    for key in sorted({k for s in shards for k in s["state"]}):
        parts = sorted((s["offset"][key], s["state"][key]) for s in shards if key in s["state"])
        E = shards[0]["num_experts"][key]
        starts = [o for o, _ in parts]
        ends = [o + t.shape[0] for o, t in parts]
        if starts[0] != 0 or ends[-1] != E or starts[1:] != ends[:-1]:
            raise CheckpointError(f"expert shards of {key} cover {list(zip(starts, ends))}, not [0, {E})")
        merged[key] = torch.cat([t for _, t in parts])
    return merged
