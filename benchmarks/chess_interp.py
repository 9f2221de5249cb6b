"""MoE-X's chess interpretability comparison at CPU scale.

    python benchmarks/chess_interp.py train      # trains every variant (resumable)
    python benchmarks/chess_interp.py interpret  # board-state coverage/reconstruction per variant
    python benchmarks/chess_interp.py table      # writes benchmarks/results/chess_interp.{md,json}

Variants share data, seed and token budget and have equal active parameters:
dense GELU and ReLU (d_ff 256), Switch (top-1 of 8 experts of 256), MoE-X (top-2
of 8 ReLU experts of 128) from scratch and upcycled from the dense ReLU model,
and a TopK SAE on the dense ReLU model's MLP activations.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipes/experiments/chess-interp-cpu.yaml"
OUT = Path("runs/chess-interp-cpu")

VARIANTS = {
    "dense-gelu": ["model.ffn=dense", "model.mlp_activation=gelu"],
    "dense-relu": ["model.ffn=dense", "model.mlp_activation=relu"],
    "switch": ["model.moe.router=topk", "model.moe.top_k=1", "model.moe.d_expert=256", "model.moe.activation=relu"],
    "moex": [],
}


def sh(*args: str) -> None:
    print("+", " ".join(args), flush=True)
    subprocess.run(args, check=True)


def train(names: list[str], extra: list[str]) -> None:
    for name in names:
        sh(sys.executable, "-m", "moex.cli", "train", str(RECIPE), *VARIANTS[name], f"train.run_name={name}",
           "train.progress=false", *extra)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("stage", choices=["train"])
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    if args.stage == "train":
        train(args.variants.split(","), args.overrides)
    return 0


if __name__ == "__main__":
    sys.exit(main())
