"""`moex export RUN --out DIR`: a trained model out of its DeepSpeed checkpoint.

    moex export runs/wikitext2-moex-small --out exported/          # safetensors + config.json + tokenizer

The directory is read back by `moex.load_pretrained(DIR)` (layout: docs/interop.md).
"""

from __future__ import annotations

import argparse


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("run", help="run directory (newest checkpoint) or checkpoint directory")
    p.add_argument("--out", required=True, help="directory to write")


def run(args) -> int:
    from moex.interop.pretrained import export_run

    out = export_run(args.run, args.out)
    print(f"wrote {out}")
    return 0
