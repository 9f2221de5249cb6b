"""MoE-X's chess interpretability comparison at CPU scale.

    export MOEX_DATA_ROOT=../shared/data
    python benchmarks/chess_interp.py train --seed 0 &      # one lane per seed, one thread each
    python benchmarks/chess_interp.py train --seed 1 &
    python benchmarks/chess_interp.py interpret --seed 0 &  # board-state metrics, probes, k-sparse
    python benchmarks/chess_interp.py interpret --seed 1 &
    python benchmarks/chess_interp.py table                 # benchmarks/results/chess_interp.{md,json}

Variants share data, token budget and seed per lane, and have equal active FFN
parameters per token (dense width F = 256): dense GELU and ReLU (d_ff 256),
Switch (top-1 of 8 experts of 256), MoE-X (top-2 of 8 ReLU experts of 128) from
scratch and upcycled (from the dense ReLU run's half-way checkpoint, then the
other half of the budget, so it sees the same tokens), Monet-VD (2 heads, 4 of 16
sub-experts per key set, 32 units each) and PEER (8 heads x top-32 of 32x32
single-neuron experts); plus a TopK SAE on the dense ReLU model. Every stage
resumes: finished runs and reports are skipped, a killed run resumes from its
last checkpoint.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipes/experiments/chess-interp-cpu.yaml"
OUT = Path("runs/chess-interp-cpu")

MOE = ["model.ffn=moe", "model.moe.activation=relu"]
VARIANTS = {
    "dense-relu": ["model.ffn=dense", "model.mlp_activation=relu"],
    "moex": MOE + ["model.moe.router=moex", "model.moe.top_k=2", "model.moe.d_expert=128"],
    "switch": MOE + ["model.moe.router=topk", "model.moe.top_k=1", "model.moe.d_expert=256"],
    "dense-gelu": ["model.ffn=dense", "model.mlp_activation=gelu"],
    "monet-vd": ["model.ffn=monet", "model.monet.mode=vd", "model.monet.num_sub_experts=16", "model.monet.num_heads=2",
                 "model.monet.top_k=4", "model.monet.d_expert=32", "model.monet.router_share_every=2"],
    "peer": ["model.ffn=peer", "model.peer.num_sub_experts=32", "model.peer.num_heads=8", "model.peer.top_k=32",
             "model.peer.activation=relu"],
}
LANE = ["dense-relu", "moex", "switch", "moex-upcycled", "sae", "dense-gelu", "monet-vd"]  # PEER: see --variants peer
SAE_LAYER = 2


def sh(*args: str) -> None:
    print("+", " ".join(args), flush=True)
    subprocess.run(args, check=True)


def run_dir(name: str, seed: int) -> Path:
    return OUT / f"{name}-s{seed}"


def max_steps() -> int:
    import yaml

    return int(yaml.safe_load(RECIPE.read_text())["train"]["max_steps"])


def train_one(name: str, seed: int, extra: list[str]) -> None:
    common = [f"train.seed={seed}", f"train.out_dir={OUT}", "train.progress=false", *extra]
    if name == "moex-upcycled":
        out = run_dir(name, seed)
        half = max_steps() // 2
        if not (out / "recipe.yaml").exists():
            dense = run_dir("dense-relu", seed) / "checkpoints" / f"step-{half:07d}"
            sh(sys.executable, "-m", "moex.cli", "upcycle", str(dense), str(RECIPE), *VARIANTS["moex"],
               "--scheme", "partition", "--out", str(out), *common)
        sh(sys.executable, "-m", "moex.cli", "train", str(out / "recipe.yaml"), f"train.max_steps={half}",
           "optim.warmup_steps=20", *common)
        return
    sh(sys.executable, "-m", "moex.cli", "train", str(RECIPE), *VARIANTS[name],
       f"train.run_name={run_dir(name, seed).name}", *common)


def sae(seed: int) -> None:
    path = run_dir("dense-relu", seed) / f"sae-L{SAE_LAYER}.pt"
    if not path.exists():
        sh(sys.executable, "-m", "moex.cli", "train-sae", str(run_dir("dense-relu", seed)),
           "--source", f"L{SAE_LAYER}.mlp.post", "--latents", "2048", "--k", "16", "--steps", "1500",
           "--samples", "100000", "--out", str(path))


FAMILY_SOURCES = (".mlp.post", ".moe.code", ".monet", ".peer")  # a model's main feature source, per layer
MODELS = ["dense-gelu", "dense-relu", "dense-relu (SAE)", "switch", "moex", "moex-upcycled", "monet-vd", "peer"]


def finished(name: str, seed: int) -> bool:
    rows = (run_dir(name, seed) / "metrics.jsonl")
    if not rows.exists():
        return False
    last = json.loads(rows.read_text().splitlines()[-1])
    want = max_steps() // 2 if name == "moex-upcycled" else max_steps()
    return last.get("step", 0) >= want and "val" in last


def interpret(seed: int, games: int, names: list[str]) -> None:
    for name in names:
        if not finished(name, seed):
            print(f"skip {name}-s{seed}: not trained", flush=True)
            continue
        out = run_dir(name, seed) / "interp-chess"
        if (out / "report.json").exists():
            continue
        sae_path = run_dir(name, seed) / f"sae-L{SAE_LAYER}.pt"
        extra = ["--sae", str(sae_path)] if name == "dense-relu" and sae_path.exists() else []
        sh(sys.executable, "-m", "moex.cli", "interpret", str(run_dir(name, seed)), "--suite", "chess",
           "--games", str(games), "--out", str(out), *extra)


def curves(seed: int, games: int, names: list[str]) -> None:
    """Interpretability over training: every kept checkpoint of `names`."""
    for name in names:
        out = run_dir(name, seed) / "interp-curve"
        if not (out / "curve.json").exists():
            sh(sys.executable, "-m", "moex.cli", "interpret", str(run_dir(name, seed)), "--suite", "chess",
               "--games", str(games), "--all-checkpoints", "--out", str(out))


def baseline(games: int, features: int = 1024, seed: int = 0) -> None:
    """Random Gaussian features on the same scoring games and split: the chance level of every metric."""
    import numpy as np

    from moex import config as C
    from moex.interp import board, bsp
    from moex.interp.chess_suite import HEADLINE, eval_games

    out = OUT / f"random-baseline-{features}.json"
    if out.exists():
        return
    cfg = C.load(str(run_dir("dense-relu", 0) / "config.yaml"), [])
    g, _ = eval_games(cfg, pgn=None, n_games=games)
    game_P, _, labels_PQ, _, slices = board.labels_for_games(g)
    lab = labels_PQ[:, slices[HEADLINE]]
    acts = np.random.default_rng(seed).standard_normal((len(game_P), features)).astype(np.float32)
    tr, te = game_P < len(g) // 2, game_P >= len(g) // 2
    cov = bsp.coverage(acts[tr], lab[tr])
    rec = bsp.reconstruction(acts[tr], lab[tr], acts[te], lab[te])
    out.write_text(json.dumps({"games": len(g), "features": features, "coverage": cov["score"],
                               "reconstruction": rec["score"], "reconstruction_detail": rec}, default=float))


def _best(rep: dict, keep) -> tuple[str, dict] | None:
    keys = [k for k in rep["sources"] if keep(k)]
    if not keys:
        return None
    k = max(keys, key=lambda s: rep["sources"][s]["coverage"]["score"])
    return k, rep["sources"][k]


def model_row(name: str, seed: int) -> dict | None:
    """One model at one seed: val loss, board probe, and its main source's best layer."""
    base = name.replace(" (SAE)", "")
    path = run_dir(base, seed) / "interp-chess" / "report.json"
    if not path.exists():
        return None
    rep = json.loads(path.read_text())
    val = json.loads((run_dir(base, seed) / "metrics.jsonl").read_text().splitlines()[-1])["val"]["loss"]
    if name.endswith("(SAE)"):
        best = _best(rep, lambda k: k.startswith("sae:"))
    else:
        best = _best(rep, lambda k: k.endswith(FAMILY_SOURCES) or ".monet" in k or ".peer" in k)
    if best is None:
        return None
    src, r = best
    probes = rep.get("probe", {})
    probe = max(probes.values(), key=lambda p: p["accuracy"]) if probes else {}
    ks = rep.get("ksparse", {}).get(src, {}).get("piece_masked", {}).get("f1", {})
    return {"model": name, "seed": seed, "val_loss": val, "source": src, "features": r["features"],
            "coverage": r["coverage"]["score"], "reconstruction": r["reconstruction"]["score"],
            "reconstruction_square": r["reconstruction"].get("square_f1"),
            "probe": probe.get("accuracy"), "probe_changed": probe.get("accuracy_changed"),
            "majority": probe.get("majority_baseline"), "majority_changed": probe.get("majority_changed"),
            "ksparse_1": ks.get("1"), "ksparse_16": ks.get("16"),
            "all_layers": {k: [v["coverage"]["score"], v["reconstruction"]["score"]] for k, v in rep["sources"].items()}}


def _ms(vals: list) -> str:
    vals = [v for v in vals if v is not None]
    if not vals:
        return "–"
    if len(vals) == 1:
        return f"{vals[0]:.3f}"
    return f"{statistics.mean(vals):.3f} ± {(max(vals) - min(vals)) / 2:.3f}"


COLUMNS = [("val_loss", "val loss"), ("probe", "board probe acc"), ("probe_changed", "probe acc (changed sq.)"),
           ("coverage", "coverage"), ("reconstruction", "reconstruction"), ("ksparse_1", "k-sparse F1 k=1"),
           ("ksparse_16", "k-sparse F1 k=16")]


def table(seeds: list[int]) -> str:
    rows = [r for name in MODELS for s in seeds if (r := model_row(name, s)) is not None]
    lines = ["| model | seeds | best source | features | " + " | ".join(c for _, c in COLUMNS) + " |",
             "|---|---:|---|---:|" + "---:|" * len(COLUMNS)]
    for name in MODELS:
        mine = [r for r in rows if r["model"] == name]
        if not mine:
            continue
        srcs = sorted({r["source"].split("[")[0] for r in mine})
        lines.append(f"| {name} | {len(mine)} | {', '.join(srcs)} | {mine[0]['features']} | "
                     + " | ".join(_ms([r[k] for r in mine]) for k, _ in COLUMNS) + " |")
    for path in sorted(OUT.glob("random-baseline-*.json")):
        b = json.loads(path.read_text())
        lines.append(f"| random Gaussian features | – | – | {b['features']} | – | – | – | {b['coverage']:.3f} | "
                     f"{b['reconstruction']:.3f} | – | – |")
    maj = [r["majority"] for r in rows if r["majority"] is not None]
    majc = [r["majority_changed"] for r in rows if r["majority_changed"] is not None]
    if maj:
        lines.append(f"| majority class per square | – | – | – | – | {_ms(maj)} | {_ms(majc)} | – | – | – | – |")
    md = "\n".join(lines) + "\n"
    res = ROOT / "benchmarks/results"
    res.mkdir(parents=True, exist_ok=True)
    (res / "chess_interp.json").write_text(json.dumps(rows, indent=2))
    (res / "chess_interp_table.md").write_text(md)
    return md


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("stage", choices=["train", "interpret", "curves", "baseline", "table"])
    ap.add_argument("--games", type=int, default=2000, help="scoring games (half labelling, half held out)")
    ap.add_argument("--seeds", default="0,1", help="table: seeds to aggregate")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--variants", default=",".join(LANE))
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    if args.stage == "train":
        for name in args.variants.split(","):
            sae(args.seed) if name == "sae" else train_one(name, args.seed, args.overrides)
    elif args.stage == "interpret":
        interpret(args.seed, args.games, [n for n in args.variants.split(",") if n != "sae"])
    elif args.stage == "baseline":
        baseline(args.games)
    elif args.stage == "curves":
        curves(args.seed, args.games, args.variants.split(","))
    else:
        print(table([int(s) for s in args.seeds.split(",")]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
