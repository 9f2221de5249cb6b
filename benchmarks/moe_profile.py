"""Where the MoE layer's time goes, next to the dense MLP of equal active FLOPs.

Shape key: T tokens, D model dim, E experts, H hidden units per expert, k experts
per token.

Profiles one training-style step (forward, loss = <y, g> + aux, backward) of the
dense MLP (d_ff = k*H) and of ``MoELayer`` (top-k router, ``gemm_backend`` as
given, default ``auto``) with ``torch.profiler`` and sorts every ATen op's self
time into categories:

- ``expert GEMMs``: matrix products of the experts (the dense MLP's two layers),
- ``router GEMMs``: products with a (T, E)-shaped operand (the router logits),
- ``gather / scatter``: index_select, index_add_, scatter/gather ops,
- ``fill / alloc``: zero fills and empty allocations,
- ``routing``: softmax, top-k, sort, bincount, cumsum,
- ``elementwise``: everything else that is an ATen op (activations, gate
  multiplies, the loss, gradient accumulation),
- ``python / autograd``: step wall time not inside any ATen op (the per-block
  Python loop of the fused op, autograd bookkeeping).

    PYTHONPATH=. python benchmarks/moe_profile.py [--rows "E,H,k,T,D;..."] [--threads 1]

Writes benchmarks/results/moe_profile.{json,md} (``--out`` to change the stem).
"""

from __future__ import annotations

import os
import sys

if "--no-thp" not in sys.argv:
    os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")

import argparse  # noqa: E402
import time  # noqa: E402
from collections import defaultdict  # noqa: E402

import torch  # noqa: E402
from moe_layer import write_results  # noqa: E402
from torch.profiler import profile  # noqa: E402

from moex.config import MoEConfig  # noqa: E402
from moex.models.mlp import DenseMLP  # noqa: E402
from moex.models.moe import MoELayer  # noqa: E402

ROWS = [(8, 1024, 2, 8192, 512), (64, 128, 2, 16384, 512)]
CATEGORIES = ["expert GEMMs", "router GEMMs", "gather / scatter", "fill / alloc", "routing", "elementwise",
              "python / autograd"]
GEMM_OPS = {"aten::mm", "aten::addmm", "aten::addmm_", "aten::bmm", "aten::_grouped_mm", "aten::baddbmm"}
GATHER_OPS = {"aten::index_select", "aten::index_add_", "aten::index_add", "aten::scatter_add_", "aten::index",
              "aten::index_put_", "aten::_index_put_impl_", "aten::gather", "aten::scatter", "aten::scatter_",
              "aten::index_copy_", "aten::embedding"}
FILL_OPS = {"aten::fill_", "aten::zero_", "aten::empty", "aten::empty_like", "aten::empty_strided",
            "aten::new_empty", "aten::new_empty_strided", "aten::resize_"}
ROUTING_OPS = {"aten::_softmax", "aten::_softmax_backward_data", "aten::topk", "aten::sort", "aten::bincount",
               "aten::cumsum", "aten::argsort", "aten::max", "aten::argmax"}


def category(name: str, shapes, T: int, E: int) -> str | None:
    if name in GEMM_OPS:
        dims = {d for s in shapes if s for d in s}
        return "router GEMMs" if {T, E} <= dims else "expert GEMMs"
    for cat, ops in (("gather / scatter", GATHER_OPS), ("fill / alloc", FILL_OPS), ("routing", ROUTING_OPS)):
        if name in ops:
            return cat
    return "elementwise" if name.startswith("aten::") else None


def profile_step(module, step, x, g, T, E, steps):
    def run():
        for p in module.parameters():
            p.grad = None
        x.grad = None
        step(x, g).backward()

    run(), run()  # warm-up
    with profile(record_shapes=True) as prof:
        t0 = time.perf_counter()
        for _ in range(steps):
            run()
        wall = (time.perf_counter() - t0) / steps
    out = defaultdict(float)
    for ev in prof.key_averages(group_by_input_shape=True):
        cat = category(ev.key, ev.input_shapes, T, E)
        if cat is not None:
            out[cat] += ev.self_cpu_time_total / 1e6 / steps
    # the profiler's own overhead inflates op times a little; report wall minus ops as python/autograd
    out["python / autograd"] = max(0.0, wall - sum(out.values()))
    return wall, dict(out)


def profile_row(E, H, k, T, D, backend, steps):
    torch.manual_seed(0)
    dense = DenseMLP(D, k * H, "relu")
    moe = MoELayer(D, MoEConfig(num_experts=E, top_k=k, d_expert=H, router="topk", activation="relu",
                                aux_loss_coef=1e-2, z_loss_coef=0.0, gemm_backend=backend))
    x = torch.randn(T, D, requires_grad=True)
    g = torch.randn(T, D)

    def moe_step(x, g):
        o = moe(x)
        return (o.y * g).sum() + sum(o.aux_losses.values())

    res = {}
    for name, module, step in (("dense", dense, lambda x, g: (dense(x).y * g).sum()), ("moex", moe, moe_step)):
        res[name] = profile_step(module, step, x, g, T, E, steps)
    return {"E": E, "H": H, "k": k, "T": T, "D": D, "backend": backend,
            "wall_s": {n: w for n, (w, _) in res.items()}, "by_category_s": {n: c for n, (_, c) in res.items()}}


def markdown(rows, threads) -> str:
    lines = [f"Per-step time by category ({threads} thread(s), fp32, torch.profiler self times, ms; "
             "'+% of dense' = (moex - dense) / dense step). Profiled steps run slower than unprofiled ones.", ""]
    for r in rows:
        wd, wm = r["wall_s"]["dense"], r["wall_s"]["moex"]
        lines += [f"**E={r['E']} H={r['H']} k={r['k']} T={r['T']} D={r['D']}** (gemm_backend={r['backend']}): "
                  f"dense {1e3 * wd:.0f} ms, moex {1e3 * wm:.0f} ms = {wm / wd:.2f}x", "",
                  "| category | dense ms | moex ms | +% of dense |", "|---|---|---|---|"]
        for c in CATEGORIES:
            d, m = r["by_category_s"]["dense"].get(c, 0.0), r["by_category_s"]["moex"].get(c, 0.0)
            lines.append(f"| {c} | {1e3 * d:.1f} | {1e3 * m:.1f} | {100 * (m - d) / wd:+.0f}% |")
        lines.append("")
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", default="", help="E,H,k,T,D;E,H,k,T,D... (default: the E=8 and E=64 issue rows)")
    ap.add_argument("--backend", default="auto")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--no-thp", action="store_true")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "moe_profile"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    rows_cfg = [tuple(int(v) for v in r.split(",")) for r in args.rows.split(";")] if args.rows else ROWS
    rows = [profile_row(*cfg, args.backend, args.steps) for cfg in rows_cfg]
    write_results(args.out, {"threads": args.threads, "torch": torch.__version__, "rows": rows},
                  markdown(rows, args.threads))


if __name__ == "__main__":
    main()
