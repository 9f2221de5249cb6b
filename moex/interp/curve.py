"""Interpretability over training: score checkpoints and plot the headline numbers against tokens seen.

`moex interpret RUN --all-checkpoints` scores every kept checkpoint of a run
(OUT/step-NNNNNNN/report.json, reused when present so an interrupted sweep
resumes); `train.interp_interval` scores the live model during training into
RUN/interp/. Both append one summary point per checkpoint to OUT/curve.json
and redraw OUT/curve.png: coverage, reconstruction, the best layer's board
probe accuracy (with its majority baseline) and k-sparse F1 against tokens seen.
"""

from __future__ import annotations

import json
from pathlib import Path

KS_GROUP = "piece_masked"  # the chess k-sparse group the curve follows


def score(loaded, out: Path, *, suite: str, probes: bool = True, sae_extra=None, pgn=None, games: int = 1000,
          conllu=None, sentences: int = 600, batch_size: int = 32, progress: bool = True,
          all_groups: bool = False) -> dict:
    """Run one suite on a loaded model; write OUT/report.json, report.md and plots; return the report.

    Chess: `all_groups` also scores coverage of the `piece` and `empty` property groups."""
    from moex.interp import report

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if suite == "chess":
        from moex.interp import chess_suite

        from moex.interp.board import PROPERTIES

        res = chess_suite.run(loaded, out_dir=out, pgn=pgn, n_games=games, batch_size=batch_size,
                              sae_extra=sae_extra, probes=probes, progress=progress,
                              groups=list(PROPERTIES) if all_groups else None)
    else:
        from moex.interp import text_suite

        res = text_suite.run(loaded, out_dir=out, conllu=conllu, max_sentences=sentences, batch_size=batch_size,
                             sae_extra=sae_extra, probes=probes)
    res.update({"checkpoint": str(loaded.ckpt_dir), "step": loaded.step, "suite": suite})
    (out / "report.json").write_text(json.dumps(res, indent=2))
    (out / "report.md").write_text(report.markdown(res))
    report.plots(res, out)
    return res


def _best(values):
    vals = [v for v in values if v is not None]
    return max(vals) if vals else None


def summary(res: dict) -> dict:
    """The headline numbers of one report: best source / layer for each measure."""
    src = res.get("sources", {})
    out = {"step": res.get("step")}
    if res.get("suite") == "chess":
        out["coverage"] = _best(r["coverage"].get("score") for r in src.values())
        out["reconstruction"] = _best(r["reconstruction"].get("score") for r in src.values())
        probe = res.get("probe", {})
        if probe:
            best = max(probe, key=lambda n: probe[n]["accuracy"])
            out.update(probe_accuracy=probe[best]["accuracy"], probe_layer=best,
                       majority_baseline=probe[best]["majority_baseline"])
        ks = {n: g[KS_GROUP]["f1"] for n, g in res.get("ksparse", {}).items() if KS_GROUP in g}
    else:
        out["mean_best_f1"] = _best(r.get("mean_best_f1") for r in src.values())
        ks = {n: r["f1"] for n, r in res.get("ksparse", {}).items()}
    for k in ("1", "16"):
        if ks:
            out[f"ksparse_f1_k{k}"] = _best(f.get(k) for f in ks.values())
    return out


def tokens_seen(cfg, step: int, world: int = 1) -> int:
    """Training tokens consumed by `step` optimizer steps (as the trainer counts them)."""
    t = cfg.train
    return step * t.batch_size * t.grad_accum * cfg.model.block_size * world


def add_point(out: Path, point: dict) -> list[dict]:
    """Insert/replace the point for its step in OUT/curve.json (sorted by step); redraw OUT/curve.png."""
    out = Path(out)
    path = out / "curve.json"
    points = json.loads(path.read_text()) if path.exists() else []
    points = sorted([p for p in points if p["step"] != point["step"]] + [point], key=lambda p: p["step"])
    path.write_text(json.dumps(points, indent=2))
    plot(points, out / "curve.png")
    return points


SERIES = [("coverage", "coverage"), ("reconstruction", "reconstruction"), ("probe_accuracy", "probe accuracy"),
          ("majority_baseline", "probe majority baseline"), ("ksparse_f1_k1", "k-sparse F1 (k=1)"),
          ("ksparse_f1_k16", "k-sparse F1 (k=16)"), ("mean_best_f1", "POS mean best F1")]


def plot(points: list[dict], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    xs = [p["tokens"] for p in points]
    for key, label in SERIES:
        ys = [p.get(key) for p in points]
        if any(y is not None for y in ys):
            ax.plot([x for x, y in zip(xs, ys) if y is not None], [y for y in ys if y is not None], marker="o",
                    label=label, ls="--" if key == "majority_baseline" else "-")
    ax.set(xlabel="tokens seen", ylabel="score", title="interpretability over training")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


def checkpoint_dirs(run_dir: Path) -> list[Path]:
    """Every complete checkpoint of a run, oldest first."""
    ckpts = sorted(p for p in (Path(run_dir) / "checkpoints").glob("step-*") if p.is_dir())
    if not ckpts:
        raise FileNotFoundError(f"{run_dir}: no checkpoints (expected {run_dir}/checkpoints/step-*)")
    return ckpts


def all_checkpoints(run_dir: Path, out: Path, *, log=print, **opts) -> list[dict]:
    """Score every kept checkpoint into OUT/<tag>/ (reusing finished ones) and write the curve."""
    from moex.checkpoint.load import load_model
    from moex import checkpoint

    points = []
    for ckpt in checkpoint_dirs(run_dir):
        rep = Path(out) / ckpt.name / "report.json"
        loaded = load_model(ckpt)
        if rep.exists():
            log(f"{ckpt.name}: reusing {rep}")
            res = json.loads(rep.read_text())
        else:
            log(f"{ckpt.name}: scoring")
            res = score(loaded, rep.parent, **opts)
        world = checkpoint.load_client_state(ckpt).get("world_size", 1)
        points = add_point(out, {**summary(res), "tokens": tokens_seen(loaded.cfg, loaded.step, world)})
    return points
