"""`moex export RUN --format hf --out DIR`: a moex model as a `transformers` checkpoint.

The family is the one whose layout computes exactly what the moex model computes
(`moex.interop.hf_config.infer_family`); a model no family matches (MoE-X router,
capacity factor, ReLU experts, ...) is refused with the reason. Writes config.json,
model.safetensors (per-expert tensors, the names every transformers version reads) and
the tokenizer when it is a Hugging Face (`tokenizer.json`) or sentencepiece one.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from moex.interop.hf_config import infer_family, to_hf_config
from moex.interop.hf_weights import export_state


def export_hf(run: str | Path, out: str | Path) -> Path:
    from safetensors.torch import save_file

    from moex.checkpoint.load import load_model

    loaded = load_model(run)
    m = loaded.cfg.model
    family = infer_family(m)
    state = export_state(family, loaded.model.state_dict(), m)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(to_hf_config(m, family), indent=1))
    tok = loaded.run_dir / "tokenizer"
    if (tok / "hf_tokenizer.json").is_file():
        shutil.copyfile(tok / "hf_tokenizer.json", out / "tokenizer.json")
    elif (tok / "tokenizer.model").is_file():
        shutil.copyfile(tok / "tokenizer.model", out / "tokenizer.model")
    return out
