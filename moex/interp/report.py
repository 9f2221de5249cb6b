"""Markdown tables and PNG plots of an interpretability report (`moex interpret`)."""

from __future__ import annotations

from pathlib import Path


def _f(x, nd=3) -> str:
    return "–" if x is None else f"{x:.{nd}f}"


def chess_rows(res: dict) -> list[dict]:
    """One row per feature source: headline coverage and reconstruction (per-class F1 at the
    best per-square threshold), per-square F1 there, and the max-active variant."""
    rows = []
    for name, r in res["sources"].items():
        cov, rec = r["coverage"], r["reconstruction"]
        rows.append({
            "source": name, "features": r["features"],
            "alive": cov.get("alive"), "coverage": cov.get("score"), "coverage_t": cov.get("threshold"),
            "reconstruction": rec.get("score"), "reconstruction_t": rec.get("threshold"),
            "per_square_f1": rec.get("per_square_f1"), "max_active": rec.get("max_active"),
            "labelled": rec.get("labelled_features"),
        })
    return rows


def markdown(res: dict) -> str:
    lines = [f"# moex interpret — {res['suite']} suite", "",
             f"checkpoint `{res['checkpoint']}` (step {res['step']})", ""]
    if res["suite"] == "chess":
        lines += [f"{res['games']} games from {res['games_from']}: {res['label_games']} for labelling, "
                  f"{res['heldout_games']} held out; {res['positions']} probed positions.", "",
                  "Coverage and reconstruction over the 768 'masked blank and initial state' board "
                  "properties (Karvonen et al.; see docs/interpretability.md). Reconstruction = F1 per class "
                  "at the threshold with the best F1 per square; max-active = the reference's t = 1.0 slot.", "",
                  "| source | features | alive | coverage | t | reconstruction | t | F1 per square | max-active "
                  "| labelled features |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for r in chess_rows(res):
            lines.append(f"| {r['source']} | {r['features']} | {r['alive']} | {_f(r['coverage'])} | "
                         f"{_f(r['coverage_t'], 1)} | {_f(r['reconstruction'])} | {_f(r['reconstruction_t'], 1)} | "
                         f"{_f(r['per_square_f1'])} | {_f(r['max_active'])} | {r['labelled']} |")
        best = max(chess_rows(res), key=lambda r: r["coverage"] or 0)
        lines += ["", f"Best source by coverage: **{best['source']}** "
                      f"(coverage {_f(best['coverage'])}, reconstruction {_f(best['reconstruction'])})."]
        lines += probe_markdown(res.get("probe", {}))
        lines += ksparse_markdown(res.get("ksparse", {}))
    else:
        lines += res.get("markdown", [])
    return "\n".join(lines) + "\n"


def probe_markdown(probe: dict) -> list[str]:
    """The residual-stream board probes: held-out accuracy beside the per-square majority class."""
    if not probe:
        return []
    lines = ["", "Linear board probes of the residual stream (64 squares x 13 classes; trained on the "
                 "labelling games, accuracy on held-out games). 'changed': only squares whose content differs "
                 "from the starting position.", "",
             "| layer | accuracy | majority baseline | accuracy (changed) | majority (changed) | train accuracy |",
             "|---|---:|---:|---:|---:|---:|"]
    for name, r in probe.items():
        lines.append(f"| {name} | {_f(r['accuracy'])} | {_f(r['majority_baseline'])} | {_f(r['accuracy_changed'])} | "
                     f"{_f(r['majority_changed'])} | {_f(r['train_accuracy'])} |")
    return lines


def ksparse_markdown(ks: dict) -> list[str]:
    """k-sparse probing: mean held-out F1 per source and property group for each k."""
    if not ks:
        return []
    first = next(iter(ks.values()))
    kk = list(next(iter(first.values()))["f1"])
    lines = ["", "k-sparse probing (Gurnee et al. 2023): mean held-out F1 of the best probe on k features "
                 "(ranked by F-statistic on the labelling games), over properties with >= 10 positives and "
                 "negatives there.", "",
             "| source | group | probed | " + " | ".join(f"k={k}" for k in kk) + " |",
             "|---|---|---:|" + "---:|" * len(kk)]
    for name, groups in ks.items():
        for g, r in groups.items():
            lines.append(f"| {name} | {g} | {r['probed']} | " + " | ".join(_f(r["f1"][k]) for k in kk) + " |")
    return lines


def plots(res: dict, out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    if res["suite"] == "chess":
        rows = chess_rows(res)
        fig, ax = plt.subplots(figsize=(max(6, 0.5 * len(rows)), 4))
        xs = range(len(rows))
        ax.bar([x - 0.2 for x in xs], [r["coverage"] or 0 for r in rows], width=0.4, label="coverage")
        ax.bar([x + 0.2 for x in xs], [r["reconstruction"] or 0 for r in rows], width=0.4, label="reconstruction")
        ax.set_xticks(list(xs), [r["source"] for r in rows], rotation=60, ha="right", fontsize=7)
        ax.set_ylabel("score")
        ax.legend()
        fig.tight_layout()
        path = Path(out) / "chess_scores.png"
        fig.savefig(path, dpi=120)
        plt.close(fig)
        written.append(path)
    for name, fn in res.get("plot_fns", {}).items():
        written.append(fn(Path(out)))
    return written
