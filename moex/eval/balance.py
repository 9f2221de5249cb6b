"""Load-balance and sparsity figures from per-layer routing statistics.

Input: `tokens_per_expert` counts (E,) summed over any number of batches.
"""

from __future__ import annotations

import math

from torch import Tensor


def balance_metrics(tokens_per_expert_E: Tensor) -> dict[str, float]:
    """CV = std/mean, MaxVio = (max - mean)/mean, load entropy / log E (1 = uniform)."""
    load = tokens_per_expert_E.double()
    E, total = load.numel(), load.sum()
    if total <= 0:
        return {"cv": 0.0, "maxvio": 0.0, "load_entropy": 0.0}
    mean = load.mean()
    p = load / total
    ent = -(p * p.clamp_min(1e-30).log()).sum()
    return {
        "cv": float(load.std(unbiased=False) / mean),
        "maxvio": float((load.max() - mean) / mean),
        "load_entropy": float(ent / math.log(E)) if E > 1 else 1.0,
    }


class StatsAccumulator:
    """Sums routing stats of many forward passes, per layer, on the stats' own device: nothing
    moves to the host (no GPU sync) until :meth:`summary`, which the trainer calls per log interval."""

    def __init__(self):
        self.layers: dict[int, dict[str, Tensor]] = {}
        self.counts: dict[int, int] = {}

    def add(self, layer_stats: list[dict[str, Tensor]]) -> None:
        for i, s in enumerate(layer_stats):
            acc = self.layers.setdefault(i, {})
            for k, v in s.items():
                v = v.detach().float()
                acc[k] = acc[k] + v if k in acc else v.clone()
            self.counts[i] = self.counts.get(i, 0) + 1

    def summary(self) -> list[dict[str, float]]:
        """Per layer: balance metrics from summed loads, means of scalar stats."""
        out = []
        for i in sorted(self.layers):
            acc, n = {k: v.cpu() for k, v in self.layers[i].items()}, self.counts[i]
            row: dict[str, float] = {"layer": i}
            if "tokens_per_expert" in acc:
                row.update(balance_metrics(acc["tokens_per_expert"]))
                row["tokens_per_expert"] = acc["tokens_per_expert"].tolist()
            for k, v in acc.items():
                if k != "tokens_per_expert" and v.numel() == 1:
                    row[k] = float(v) / n
            out.append(row)
        return out


def format_balance(summary: list[dict]) -> str:
    """One short line per sparse layer for the console."""
    lines = []
    for row in summary:
        if "cv" not in row:
            continue
        lines.append(
            f"  layer {row['layer']}: CV {row['cv']:.3f}  MaxVio {row['maxvio']:.3f}  "
            f"load-H {row['load_entropy']:.3f}  router-H {row.get('router_entropy', 0):.3f}  "
            f"active {100 * row.get('active_frac', 0):.2f}%  dropped {100 * row.get('dropped_frac', 0):.2f}%"
        )
    return "\n".join(lines)
