"""The compare report: one table (JSON + Markdown) and PNG plots (matplotlib Agg).

Rows come from each variant's evaluation record (see runner.py). Interpretability
suites add columns through `extra`: {column name: {variant: value}}.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from moex.compare.runner import read_metrics, run_dir

COLUMNS = [  # (key, header, format)
    ("variant", "variant", "{}"),
    ("val_loss", "val loss", "{:.4f}"),
    ("ppl", "ppl", "{:.3f}"),
    ("tokens_per_s", "tok/s", "{:,.0f}"),
    ("params_total", "params total", "{:,}"),
    ("params_active", "params active", "{:,}"),
    ("cv", "balance CV", "{:.3f}"),
    ("maxvio", "MaxVio", "{:.3f}"),
    ("dropped_frac", "dropped", "{:.2%}"),
    ("router_entropy", "router H", "{:.3f}"),
    ("active_frac", "active units", "{:.2%}"),
]


def _mean(rows: list[dict], key: str):
    vals = [r[key] for r in rows if key in r and r[key] is not None]
    return sum(vals) / len(vals) if vals else None


def summarise(name: str, res: dict) -> dict:
    """One table row from an evaluation record; balance figures averaged over sparse layers."""
    layers = res.get("layers", [])
    sparse = [r for r in layers if "cv" in r]
    return {
        "variant": name,
        "val_loss": res["loss"],
        "ppl": res["ppl"],
        "tokens_per_s": res.get("train", {}).get("tokens_per_s"),
        "params_total": res.get("params", {}).get("params_total"),
        "params_active": res.get("params", {}).get("params_active"),
        "cv": _mean(sparse, "cv"),
        "maxvio": _mean(sparse, "maxvio"),
        "dropped_frac": _mean(sparse, "dropped_frac"),
        "router_entropy": _mean(sparse, "router_entropy"),
        # hidden-unit sparsity: fraction of all hidden units active per token (dense layers included)
        "active_frac": _mean(layers, "active_frac"),
        "steps": res.get("train", {}).get("steps"),
    }


def _cell(v, fmt: str) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "–"
    try:
        return fmt.format(v)
    except (ValueError, TypeError):
        return str(v)


def markdown_table(rows: list[dict], extra: dict[str, dict] | None = None) -> str:
    extra = extra or {}
    heads = [h for _, h, _ in COLUMNS] + list(extra)
    lines = ["| " + " | ".join(heads) + " |", "|" + "|".join("---" for _ in heads) + "|"]
    for r in rows:
        cells = [_cell(r.get(k), f) for k, _, f in COLUMNS]
        cells += [_cell(col.get(r["variant"]), "{:.3f}" if isinstance(col.get(r["variant"]), float) else "{}")
                  for col in extra.values()]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_report(out: Path, results: dict[str, dict], *, recipe: str, overrides: list[str],
                 extra: dict[str, dict] | None = None) -> dict:
    """Write OUT/compare.json, OUT/compare.md and the plots; returns the JSON payload."""
    out = Path(out)
    rows = [summarise(name, res) for name, res in results.items()]
    for col, vals in (extra or {}).items():
        for r in rows:
            r[col] = vals.get(r["variant"])
    payload = {"recipe": recipe, "overrides": overrides, "rows": rows,
               "layers": {n: res.get("layers", []) for n, res in results.items()}}
    (out / "compare.json").write_text(json.dumps(payload, indent=2))
    plots = plot_all(out, results)
    md = [f"# moex compare: {recipe}", "",
          f"Overrides: `{' '.join(overrides) or '(none)'}`. Matched active FFN parameters per token; "
          "balance columns are means over sparse layers (Monet: over its 2N sub-experts; PEER: over N^2 experts).",
          "", markdown_table(rows, extra), ""]
    md += [f"![{p.stem}]({p.name})" for p in plots]
    (out / "compare.md").write_text("\n".join(md) + "\n")
    return payload


def plot_all(out: Path, results: dict[str, dict]) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    paths = []
    fig, (ax_t, ax_v) = plt.subplots(1, 2, figsize=(11, 4))
    for name in results:
        recs = read_metrics(run_dir(out, name) / "metrics.jsonl")
        if not recs:
            continue
        ax_t.plot([r["step"] for r in recs], [r["loss"] for r in recs], label=name, lw=1)
        val = [(r["step"], r["val"]["loss"]) for r in recs if "val" in r]
        if val:
            ax_v.plot(*zip(*val), marker="o", label=name, lw=1)
    ax_t.set(title="train loss", xlabel="step")
    ax_v.set(title="val loss", xlabel="step")
    ax_t.legend(fontsize=7)
    fig.tight_layout()
    paths.append(out / "loss_curves.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)
    for name, res in results.items():  # per-expert load (relative to the mean) per sparse layer
        rows = [r for r in res.get("layers", []) if "tokens_per_expert" in r]
        if not rows:
            continue
        width = max(len(r["tokens_per_expert"]) for r in rows)
        load = np.full((len(rows), width), np.nan)
        for i, r in enumerate(rows):
            t = np.asarray(r["tokens_per_expert"], dtype=float)
            load[i, : t.size] = t / max(t.mean(), 1e-9)
        fig, ax = plt.subplots(figsize=(min(12, 2 + 0.35 * width), 1 + 0.5 * len(rows)))
        im = ax.imshow(load, aspect="auto", cmap="viridis", interpolation="nearest")
        ax.set(title=f"{name}: expert load / mean", xlabel="expert", ylabel="layer",
               yticks=range(len(rows)), yticklabels=[str(r["layer"]) for r in rows])
        fig.colorbar(im, ax=ax)
        fig.tight_layout()
        paths.append(out / f"load_{name}.png")
        fig.savefig(paths[-1], dpi=110)
        plt.close(fig)
    return paths
