"""`moex export RUN --out DIR [--format moex|hf]`: a trained model out of its DeepSpeed checkpoint.

    moex export runs/wikitext2-moex-small --out exported/          # safetensors + config.json + tokenizer
    moex export runs/olmoe --format hf --out hf-olmoe/              # a transformers checkpoint again

`--format moex` is read back by `moex.load_pretrained(DIR)`; `--format hf` writes a
checkpoint `transformers` loads, for the families whose layout matches (docs/interop.md).
"""

from __future__ import annotations

import argparse


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("run", help="run directory (newest checkpoint) or checkpoint directory")
    p.add_argument("--out", required=True, help="directory to write")
    p.add_argument("--format", choices=["moex", "hf"], default="moex")


def run(args) -> int:
    if args.format == "hf":
        from moex.interop.hf_export import export_hf

        out = export_hf(args.run, args.out)
    else:
        from moex.interop.pretrained import export_run

        out = export_run(args.run, args.out)
    print(f"wrote {out}")
    return 0
