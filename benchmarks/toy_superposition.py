"""Toy models of superposition with moex's real layers: is MoE-X's code more monosemantic than a dense MLP's?

    python benchmarks/toy_superposition.py [--shard 0/2]    # train + score, cached per run (resumable)
    python benchmarks/toy_superposition.py --table-only     # table, JSON and plot from the cache
    python benchmarks/toy_superposition.py --rescore        # metrics again from the saved weights

Every family (dense ReLU/GELU, Switch, MoE-X, Monet-VD, PEER; moex/interp/toy.py) is trained
on the same sparse-feature task at equal active expert parameters (2 n d), for each sparsity S
at n/d = --base-ratio, and for each n/d at S = --base-sparsity, with --seeds seeds each.
Each finished run is appended to the cache (one JSON line), so an interrupted sweep loses at
most one run. Writes benchmarks/results/toy_superposition.{md,json,png}.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from moe_layer import write_results  # noqa: E402

from moex.interp.toy import FAMILIES, ToyModel, ToyTask, active_params, build_ffn, train  # noqa: E402
from moex.interp.toy_metrics import evaluate  # noqa: E402

METRICS = ("loss_rel", "represented", "top_share", "features_per_unit", "coverage", "reconstruction",
           "ksparse_f1_k1", "ksparse_f1_k4")


def configs(args) -> list[dict]:
    """(S, n/d) points: the S sweep at the base ratio, then the other ratios at the base sparsity."""
    pts = [(s, args.base_ratio) for s in args.sparsities]
    pts += [(args.base_sparsity, r) for r in args.ratios if (args.base_sparsity, r) not in pts]
    # points in order, all seeds of a point together: an interrupted sweep has whole points
    return [{"family": f, "n": args.n, "d": args.n // r, "sparsity": s, "seed": seed}
            for s, r in pts for seed in range(args.seeds) for f in args.families]


def key(c: dict, args) -> str:
    return f"{c['family']}|n{c['n']}|d{c['d']}|S{c['sparsity']}|seed{c['seed']}|steps{args.steps}|B{args.batch}|lr{args.lr}"


def load_cache(cache_dir: Path) -> dict:
    done = {}
    for f in sorted(cache_dir.glob("cache*.jsonl")):
        for line in f.read_text().splitlines():
            if line.strip():
                rec = json.loads(line)
                done[rec["key"]] = rec
    return done


def model_path(c: dict, args) -> Path:
    return Path(args.cache) / "models" / (key(c, args).replace("|", "_") + ".pt")


def build(c: dict, args) -> tuple[ToyTask, ToyModel]:
    task = ToyTask(n=c["n"], d=c["d"], sparsity=c["sparsity"], importance_decay=args.importance_decay)
    torch.manual_seed(c["seed"])
    return task, ToyModel(build_ffn(c["family"], c["n"], c["d"]), c["n"])


def run_one(c: dict, args) -> dict:
    """Train, keep the weights (so the metrics can be recomputed with --rescore), evaluate."""
    task, model = build(c, args)
    t0 = time.process_time()
    curve = train(model, task, steps=args.steps, batch=args.batch, lr=args.lr, seed=1000 + c["seed"])
    model_path(c, args).parent.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), model_path(c, args))
    res = evaluate(model, task, seed=777 + c["seed"])
    return {**c, **res, "active_params": active_params(model.ffn), "curve": curve,
            "cpu_s": round(time.process_time() - t0, 1)}


def rescore(args) -> None:
    """Recompute every cached run's metrics from its saved weights (after a metric changes); no training."""
    cache_dir = Path(args.cache)
    done = load_cache(cache_dir)
    recs = []
    for c in configs(args):
        rec = done.get(key(c, args))
        if rec is not None:
            task, model = build(c, args)
            model.load_state_dict(torch.load(model_path(c, args)))
            recs.append({**rec, **evaluate(model, task, seed=777 + c["seed"])})
    for f in cache_dir.glob("cache*.jsonl"):
        f.unlink()
    (cache_dir / "cache.0.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    print(f"rescored {len(recs)} runs")


def sweep(args) -> None:
    cache_dir = Path(args.cache)
    cache_dir.mkdir(parents=True, exist_ok=True)
    i, k = map(int, args.shard.split("/"))
    todo = [c for j, c in enumerate(configs(args)) if j % k == i]
    done = load_cache(cache_dir)
    with open(cache_dir / f"cache.{i}.jsonl", "a") as f:
        for c in todo:
            if key(c, args) in done:
                continue
            rec = {"key": key(c, args), **run_one(c, args)}
            f.write(json.dumps(rec) + "\n")
            f.flush()
            print(f"{rec['key']}: loss/zero {rec['loss_rel']:.3f} represented {rec['represented']} "
                  f"top-share {rec['top_share']:.3f} feats/unit {rec['features_per_unit']:.2f} "
                  f"coverage {rec['coverage']:.3f} ({rec['cpu_s']}s)", flush=True)


def aggregate(args) -> list[dict]:
    """One row per (S, n/d, family): mean, std, min, max over seeds of every metric."""
    done = load_cache(Path(args.cache))
    groups: dict[tuple, list[dict]] = {}
    for c in configs(args):
        rec = done.get(key(c, args))
        if rec is not None:
            groups.setdefault((c["sparsity"], c["n"] // c["d"], c["family"]), []).append(rec)
    rows = []
    for (s, r, fam), recs in groups.items():
        row = {"sparsity": s, "ratio": r, "family": fam, "d": recs[0]["d"], "seeds": len(recs),
               "active_params": recs[0]["active_params"], "units": recs[0]["units"]}
        for m in METRICS + ("alive_units",):
            v = np.array([rec.get(m, np.nan) for rec in recs], dtype=float)  # nan: not scored (see --rescore)
            row[m] = {"mean": float(v.mean()), "std": float(v.std()), "min": float(v.min()), "max": float(v.max()),
                      "values": v.tolist()}
        rows.append(row)
    return rows


def separation(rows: list[dict], a: str = "moex", b: str = "dense-relu", m: str = "top_share") -> list[dict]:
    """Per (S, n/d): the difference of means and whether the seed ranges of a and b are disjoint."""
    by = {(r["sparsity"], r["ratio"], r["family"]): r for r in rows}
    out = []
    for (s, r, fam), row in sorted(by.items()):
        if fam != a or (s, r, b) not in by:
            continue
        x, y = row[m], by[(s, r, b)][m]
        out.append({"sparsity": s, "ratio": r, "diff": x["mean"] - y["mean"],
                    "disjoint": x["min"] > y["max"] or x["max"] < y["min"]})
    return out


def fmt(v: dict, digits: int = 3) -> str:
    return "–" if np.isnan(v["mean"]) else f"{v['mean']:.{digits}f} ± {v['std']:.{digits}f}"


def markdown(rows: list[dict], args) -> str:
    lines = [f"# Toy models of superposition: n = {args.n} features, importance {args.importance_decay}^i",
             "", f"Command: `{' '.join(['python', 'benchmarks/toy_superposition.py', *args.argv])}`", "",
             f"{args.steps} Adam steps of {args.batch} fresh samples per model (lr {args.lr}, cosine); "
             f"mean ± std over seeds (n = seeds column). loss/zero = importance-weighted MSE / that of predicting 0. "
             "represented = features with ||W_i|| > 0.5 (self-gain). top share / feats per unit = per-unit "
             "monosemanticity (mass-weighted). coverage / reconstruction: Karvonen-style, properties = "
             "'feature i present'. k=1 / k=4 probe: held-out F1 of the best 1- / 4-unit logistic probe per feature "
             "(k-sparse probing).", "",
             "| S | n/d | family | seeds | active params | units (alive) | loss/zero | represented | top share "
             "| feats/unit | coverage | reconstruction | k=1 probe | k=4 probe |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: (r["ratio"], r["sparsity"], FAMILIES.index(r["family"]))):
        lines.append(f"| {r['sparsity']} | {r['ratio']} | {r['family']} | {r['seeds']} | {r['active_params']} "
                     f"| {r['units']} ({r['alive_units']['mean']:.0f}) | {fmt(r['loss_rel'])} "
                     f"| {fmt(r['represented'], 1)} | {fmt(r['top_share'])} | {fmt(r['features_per_unit'], 2)} "
                     f"| {fmt(r['coverage'])} | {fmt(r['reconstruction'])} | {fmt(r['ksparse_f1_k1'])} "
                     f"| {fmt(r['ksparse_f1_k4'])} |")
    lines += ["", "MoE-X minus dense ReLU, top-feature share per unit (disjoint = every MoE-X seed on one side of "
              "every dense seed):", "", "| S | n/d | difference | seeds disjoint |", "|---|---|---|---|"]
    for s in separation(rows):
        lines.append(f"| {s['sparsity']} | {s['ratio']} | {s['diff']:+.3f} | {'yes' if s['disjoint'] else 'no'} |")
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], args, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("top_share", "top feature's share of unit mass"), ("features_per_unit", "features per unit"),
              ("represented", "features represented"), ("coverage", "coverage"), ("loss_rel", "loss / zero loss")]
    fig, axes = plt.subplots(2, len(panels), figsize=(4 * len(panels), 7))
    sweeps = [("sparsity", lambda r: r["ratio"] == args.base_ratio, f"S (n/d = {args.base_ratio})"),
              ("ratio", lambda r: r["sparsity"] == args.base_sparsity, f"n/d (S = {args.base_sparsity})")]
    for row_ax, (xkey, keep, xlabel) in zip(axes, sweeps):
        for ax, (m, title) in zip(row_ax, panels):
            for fam in args.families:
                pts = sorted((r[xkey], r[m]) for r in rows if r["family"] == fam and keep(r))
                if not pts:
                    continue
                xs = np.arange(len(pts)) if xkey == "sparsity" else [p[0] for p in pts]
                mean = np.array([p[1]["mean"] for p in pts])
                lo, hi = mean - np.array([p[1]["min"] for p in pts]), np.array([p[1]["max"] for p in pts]) - mean
                bold = fam in ("moex", "dense-relu")
                ax.errorbar(xs, mean, yerr=[lo, hi], marker="o", capsize=3, label=fam, lw=2.5 if bold else 1,
                            alpha=1.0 if bold else 0.6)
                if xkey == "sparsity":
                    ax.set_xticks(xs, [str(p[0]) for p in pts])
            if xkey == "ratio":
                ax.set_xscale("log", base=2)
            ax.set_title(title)
            ax.set_xlabel(xlabel)
    axes[0][0].legend(fontsize=8)
    fig.suptitle("Toy models of superposition, equal active parameters (bars: min-max over seeds)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"wrote {path}")


def command_args(argv: list[str]) -> list[str]:
    """The arguments that define the results (not --shard, --table-only, --rescore)."""
    out, skip = [], False
    for a in argv:
        if skip or a in ("--table-only", "--rescore") or a.startswith("--shard="):
            skip = False
            continue
        skip = a == "--shard"
        if not skip:
            out.append(a)
    return out


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=32)
    p.add_argument("--sparsities", type=lambda s: [float(v) for v in s.split(",")], default=[0.7, 0.9, 0.97, 0.99])
    p.add_argument("--ratios", type=lambda s: [int(v) for v in s.split(",")], default=[2, 4, 8], help="n/d values")
    p.add_argument("--base-ratio", type=int, default=4)
    p.add_argument("--base-sparsity", type=float, default=0.9)
    p.add_argument("--importance-decay", type=float, default=0.9)
    p.add_argument("--families", type=lambda s: s.split(","), default=list(FAMILIES))
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--lr", type=float, default=1e-2)
    p.add_argument("--shard", default="0/1", help="i/k: run every k-th configuration starting at i")
    p.add_argument("--cache", default="runs/toy_superposition")
    p.add_argument("--out", default="benchmarks/results/toy_superposition")
    p.add_argument("--table-only", action="store_true")
    p.add_argument("--rescore", action="store_true", help="recompute the metrics of cached runs from their weights")
    args = p.parse_args(argv)
    args.argv = command_args(sys.argv[1:] if argv is None else argv)
    bad = [f for f in args.families if f not in FAMILIES]
    if bad:
        p.error(f"unknown families {bad}; valid: {', '.join(FAMILIES)}")
    if any(args.n % r or (args.n // r) % 4 for r in args.ratios + [args.base_ratio]):
        p.error(f"every n/d must divide n={args.n} into a d that is a multiple of 4 (MoE-X and Monet-VD split d)")
    torch.set_num_threads(1)
    if args.rescore:
        rescore(args)
    elif not args.table_only:
        sweep(args)
    rows = aggregate(args)
    if not rows:
        p.error(f"no finished runs in {args.cache}")
    write_results(args.out, {"argv": args.argv, "rows": rows, "separation": separation(rows)}, markdown(rows, args))
    plot(rows, args, args.out + ".png")


if __name__ == "__main__":
    main()
