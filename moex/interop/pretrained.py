"""`moex export RUN --out DIR` (moex format) and `moex.load_pretrained(DIR)`.

An exported directory holds:
    model.safetensors   the GPT state dict under its own names; experts stay stacked
                        (`blocks.i.ffn.experts.w1_EDH` is E x D x H, `w2_EHD` E x H x D);
                        a tied `lm_head.weight` is stored once, as `wte.weight`
    config.json         {"format": "moex", "format_version": 1, "model": <ModelConfig>, "source": ...}
    tokenizer/          the run's tokenizer (`moex.data.load_tokenizer(DIR / "tokenizer")`)

Loading needs neither DeepSpeed nor the training run.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from moex import config as C

FORMAT = "moex"
FORMAT_VERSION = 1
WEIGHTS = "model.safetensors"
CONFIG = "config.json"


def _tensors_for_file(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    state = model.state_dict()
    if getattr(model.cfg, "tie_embeddings", False):
        state.pop("lm_head.weight", None)  # the same tensor as wte.weight; safetensors stores it once
    return {k: v.detach().cpu().contiguous() for k, v in state.items()}


def save_pretrained(model: torch.nn.Module, out: str | Path, *, tokenizer_dir: str | Path | None = None,
                    source: dict | None = None) -> Path:
    """Write `model` (a moex GPT) as safetensors + config.json (+ tokenizer) into `out`."""
    from safetensors.torch import save_file

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    save_file(_tensors_for_file(model), str(out / WEIGHTS), metadata={"format": FORMAT})
    meta = {"format": FORMAT, "format_version": FORMAT_VERSION, "model": C.to_dict(model.cfg), "source": source or {}}
    (out / CONFIG).write_text(json.dumps(meta, indent=1))
    if tokenizer_dir is not None and Path(tokenizer_dir).is_dir():
        shutil.copytree(tokenizer_dir, out / "tokenizer", dirs_exist_ok=True)
    return out


def export_run(run: str | Path, out: str | Path) -> Path:
    """A run or checkpoint directory -> an exported directory (see the module docstring)."""
    from moex.checkpoint.load import load_model

    loaded = load_model(run)
    source = {"checkpoint": str(loaded.ckpt_dir), "step": loaded.step}
    return save_pretrained(loaded.model, out, tokenizer_dir=loaded.run_dir / "tokenizer", source=source)


def read_config(path: str | Path) -> C.ModelConfig:
    """The ModelConfig in an exported directory's config.json (validated like a recipe)."""
    f = Path(path) / CONFIG
    if not f.is_file():
        raise FileNotFoundError(f"{path}: no {CONFIG}; not a directory written by `moex export`")
    meta = json.loads(f.read_text())
    if meta.get("format") != FORMAT:
        raise ValueError(f"{f}: format {meta.get('format')!r} is not a moex export (for a Hugging Face checkpoint "
                         f"use `moex import hf {path} --out RUN`)")
    if meta.get("format_version", 0) > FORMAT_VERSION:
        raise ValueError(f"{f}: format_version {meta['format_version']} is newer than this moex reads ({FORMAT_VERSION})")
    cfg = C.from_saved({"model": meta["model"]})
    C.validate(cfg)
    return cfg.model


def load_pretrained(path: str | Path, *, device: str | torch.device = "cpu") -> torch.nn.Module:
    """Rebuild a moex GPT from a directory written by `moex export` (eval mode, on `device`).

    The tokenizer, when exported, is `moex.data.load_tokenizer(Path(path) / "tokenizer")`.
    """
    from safetensors.torch import load_file

    from moex.models import GPT

    cfg = read_config(path)
    with torch.device("meta"):
        model = GPT(cfg)
    state = load_file(str(Path(path) / WEIGHTS))
    if cfg.tie_embeddings:
        state["lm_head.weight"] = state["wte.weight"]
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    if missing or unexpected:
        raise ValueError(f"{path}/{WEIGHTS} does not match its config (missing {missing}, unexpected {unexpected})")
    if cfg.tie_embeddings:
        model.lm_head.weight = model.wte.weight
    _materialise_buffers(model, cfg)
    return model.to(device).eval()


def _materialise_buffers(model: torch.nn.Module, cfg: C.ModelConfig) -> None:
    """Non-persistent buffers are not in the file: take them from a model built on the CPU."""
    meta_bufs = [n for n, b in model.named_buffers() if b.is_meta]
    if meta_bufs:
        from moex.models import GPT

        fresh = dict(GPT(cfg).named_buffers())
        for name in meta_bufs:
            mod_name, _, leaf = name.rpartition(".")
            mod = model.get_submodule(mod_name) if mod_name else model
            mod._buffers[leaf] = fresh[name]
