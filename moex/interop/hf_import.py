"""`moex import hf DIR_OR_NAME --out RUN`: a Hugging Face checkpoint as a moex run directory.

    moex import hf ./OLMoE-1B-7B --out runs/olmoe
    moex eval runs/olmoe                              # WikiText-2 valid unless data.* overrides say otherwise
    moex interpret runs/olmoe --suite text --out interp-olmoe
    moex train runs/olmoe/config.yaml                 # fine-tunes into runs/olmoe-finetune (train.init_from=RUN)

The run directory holds a weights-only checkpoint (`checkpoints/step-0000000`, read
by `moex eval`, `interpret`, `upcycle` and `train.init_from`), `config.yaml`, the
tokenizer (`tokenizer.json` through `tokenizers`, or `tokenizer.model` through
sentencepiece) and `import.json` (the source and its config). Families and layout:
docs/interop.md. Dotted overrides after the options set the run's data/train
settings (e.g. `data.path=my.txt`); model fields come from the checkpoint.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import torch

from moex import config as C
from moex.interop.errors import InteropError
from moex.interop.hf_config import family_of, read_hf_config, to_moex_config
from moex.interop.hf_weights import import_state

# The data a fresh import is evaluated and fine-tuned on unless overridden (as recipes/wikitext2-*).
DEFAULT_DATA = {"source": "text", "path": "wikitext-2/train.txt", "val_path": "wikitext-2/valid.txt"}


def resolve_source(src: str) -> Path:
    """A local directory, or a hub name fetched through huggingface_hub (a clear error without a network)."""
    p = Path(src)
    if p.is_dir():
        return p
    if p.exists() or src.startswith((".", "/")) or src.count("/") != 1:
        raise InteropError(f"{src}: not a checkpoint directory (nor a hub name such as owner/model)")
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(src, allow_patterns=["*.json", "*.safetensors", "*.bin", "tokenizer.model"]))
    except Exception as e:  # offline, unknown repo, gated model: one line naming the cause
        cause = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise InteropError(f"cannot download {src!r} from the Hugging Face hub ({type(e).__name__}: {cause}); "
                           f"without a network, download it elsewhere and pass its local directory") from None


def read_weights(directory: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a (possibly sharded) safetensors or PyTorch checkpoint."""
    files = sorted(directory.glob("*.safetensors"))
    if files:
        from safetensors.torch import load_file

        return {k: v for f in files for k, v in load_file(str(f)).items()}
    files = sorted(directory.glob("pytorch_model*.bin"))
    if files:
        return {k: v for f in files for k, v in torch.load(f, map_location="cpu", weights_only=True).items()}
    raise InteropError(f"{directory}: no *.safetensors or pytorch_model*.bin weights")


def save_tokenizer(directory: Path, out: Path) -> str:
    """The checkpoint's tokenizer as a moex tokenizer in `out`; returns its kind."""
    from moex.data.tokenizers import HFTokenizer, SentencePieceTokenizer

    if (directory / "tokenizer.json").is_file():
        tok = HFTokenizer((directory / "tokenizer.json").read_text())
    elif (directory / "tokenizer.model").is_file():
        tok = SentencePieceTokenizer((directory / "tokenizer.model").read_bytes())
    else:
        raise InteropError(f"{directory}: no tokenizer.json or tokenizer.model (moex needs the model's tokenizer)")
    tok.save(out)
    return tok.kind


def import_hf(src: str, out: str | Path, overrides: list[str] | None = None) -> Path:
    """Convert a Hugging Face checkpoint into the moex run directory `out`; returns it."""
    from moex.models import GPT
    from moex import checkpoint

    directory = resolve_source(src)
    hf = read_hf_config(directory)
    family = family_of(hf)
    model_cfg = to_moex_config(hf)
    out = Path(out)
    if (out / "checkpoints").exists():
        raise InteropError(f"{out} already holds a run; choose another --out")
    state = import_state(family, read_weights(directory), model_cfg)
    with torch.device("meta"):
        expected = GPT(model_cfg).state_dict()
    if model_cfg.tie_embeddings:
        expected.pop("lm_head.weight")
    bad = {k for k in expected.keys() ^ state.keys()} | {k for k in state if k in expected and
                                                          state[k].shape != expected[k].shape}
    if bad:
        raise InteropError(f"{directory}: converted weights do not fit the model config ({sorted(bad)[:4]} ...)")
    tmp = out.with_name(out.name + ".importing")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        kind = save_tokenizer(directory, tmp / "tokenizer")
        cfg = _run_config(model_cfg, kind, out, overrides or [])
        checkpoint.save_weights(tmp / "checkpoints", 0, state, {"config": C.to_dict(cfg)})
        (tmp / "config.yaml").write_text(C.dump(cfg))
        (tmp / "import.json").write_text(json.dumps({"source": str(src), "family": family, "hf_config": hf}, indent=1))
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp.rename(out)  # nothing half-written is left under --out
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def _run_config(model_cfg: C.ModelConfig, tokenizer: str, out: Path, overrides: list[str]) -> C.Config:
    """config.yaml: the model, WikiText-2 data (overridable) and a fine-tune run next to `out` from its weights."""
    bad = [o for o in overrides if o.split("=", 1)[0].strip().startswith("model.")]
    if bad:
        raise InteropError(f"{bad[0]}: model fields come from the checkpoint; only data/train/optim settings can be set")
    data = {"model": C.to_dict(model_cfg), "data": {**DEFAULT_DATA, "tokenizer": tokenizer},
            "train": {"out_dir": str(out.parent), "run_name": out.name + "-finetune", "init_from": str(out.resolve())}}
    cfg = C.from_dict(C.apply_overrides(data, overrides))
    C.validate(cfg)
    return cfg


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("kind", choices=["hf"], help="source format: hf = a Hugging Face transformers checkpoint")
    p.add_argument("source", help="local checkpoint directory, or a hub name (owner/model) where a network exists")
    p.add_argument("--out", required=True, help="run directory to create")
    p.add_argument("overrides", nargs="*", help="data/train settings for config.yaml, e.g. data.path=my.txt")


def run(args) -> int:
    out = import_hf(args.source, args.out, args.overrides)  # an InteropError is one line from the CLI
    print(f"wrote {out} (evaluate with `moex eval {out}`, fine-tune with `moex train {out}/config.yaml`)")
    return 0
