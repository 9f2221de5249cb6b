"""Grouped GEMM and permutation speed on this machine, as ratios taken in one run.

Shape key: T tokens, D model dim, H expert hidden, E experts, k experts per token,
A = T*k assignment rows.

For each MoE-like shape it times forward+backward of the expert GEMM pair
(x_AD @ w1_EDH, then @ w2_EHD) per grouped_mm backend, a dense matmul of the same
FLOPs (the machine's own matmul rate), and the dispatch (sort by expert +
gather) / gated combine against an alternative. Prints a Markdown table and writes benchmarks/results/gemm.json.

    PYTHONPATH=. python benchmarks/gemm.py [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time

import torch

from moex.ops import gated_scatter_add, grouped_mm, sort_by_expert


def bench(fn, reps: int) -> float:
    fn()  # warm-up
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return sorted(ts)[len(ts) // 2]


def routing(T, k, E, seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(T, E, generator=g)
    gate_TK, expert_TK = logits.softmax(-1).topk(k, dim=-1)
    return torch.arange(T).repeat_interleave(k), expert_TK.reshape(-1), gate_TK.reshape(-1)


def dispatch(x_TD, token_A, expert_A, E):
    """Rows grouped by expert: (x_AD, token and gate order, counts_E) -- what the layer's unfused path does."""
    order_A, counts_E = sort_by_expert(expert_A, E)
    token_S = token_A.index_select(0, order_A)
    return x_TD.index_select(0, token_S), order_A, token_S, counts_E


def gemm_pair_fn(x_TD, w1, w2, token_A, expert_A, gate_A, E, backend):
    def run():
        x_AD, order_A, token_S, counts_E = dispatch(x_TD, token_A, expert_A, E)
        h = torch.relu(grouped_mm(x_AD, w1, counts_E, backend=backend))
        y = gated_scatter_add(grouped_mm(h, w2, counts_E, backend=backend), gate_A[order_A], token_S, x_TD.shape[0])
        y.sum().backward()
    return run


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--reps", type=int, default=5)
    args = ap.parse_args()
    shapes = [(512, 128, 256, 8, 2), (2048, 256, 512, 8, 2), (2048, 256, 128, 64, 4)]
    if args.quick:
        shapes = shapes[:1]
    rows = []
    for T, D, H, E, k in shapes:
        for dtype in (torch.float32, torch.bfloat16):
            token_A, expert_A, gate_A = routing(T, k, E)
            x = torch.randn(T, D, dtype=dtype, requires_grad=True)
            w1 = (torch.randn(E, D, H, dtype=dtype) * 0.05).requires_grad_()
            w2 = (torch.randn(E, H, D, dtype=dtype) * 0.05).requires_grad_()
            A = T * k
            flops = 3 * 2 * (2 * A * D * H)  # fwd + 2 bwd GEMMs, two layers
            xa = torch.randn(A, D, dtype=dtype, requires_grad=True)
            wd1 = (torch.randn(D, H, dtype=dtype) * 0.05).requires_grad_()
            wd2 = (torch.randn(H, D, dtype=dtype) * 0.05).requires_grad_()
            t_dense = bench(lambda: (torch.relu(xa @ wd1) @ wd2).sum().backward(), args.reps)
            r = {"T": T, "D": D, "H": H, "E": E, "k": k, "dtype": str(dtype).split(".")[-1],
                 "dense_same_flops_s": t_dense, "dense_gflops": flops / t_dense / 1e9}
            for backend in ("loop", "torch"):
                t = bench(gemm_pair_fn(x, w1, w2, token_A, expert_A, gate_A, E, backend), args.reps)
                r[f"{backend}_s"] = t
                r[f"{backend}_gflops"] = flops / t / 1e9
            # permutation alone: forward+backward
            xs = torch.randn(T, D, dtype=dtype, requires_grad=True)
            gs = gate_A.clone().requires_grad_()

            def perm_ops():
                x_AD, order_A, token_S, _ = dispatch(xs, token_A, expert_A, E)
                gated_scatter_add(x_AD * 2, gs[order_A], token_S, T).sum().backward()

            def perm_alt():  # advanced indexing + dense (T, k, D) combine, token-major only
                order_A = torch.argsort(expert_A, stable=True)
                x_AD = xs[token_A[order_A]]
                inv_A = torch.empty_like(order_A)
                inv_A[order_A] = torch.arange(A)
                y_TKD = (x_AD * 2)[inv_A].view(T, k, D)
                (y_TKD * gs.view(T, k, 1).to(dtype)).sum(1).sum().backward()

            r["permute_unpermute_s"] = bench(perm_ops, args.reps)
            r["permute_alt_dense_combine_s"] = bench(perm_alt, args.reps)
            rows.append(r)
            print(f"done T={T} D={D} H={H} E={E} k={k} {r['dtype']}", flush=True)
    hdr = "| T | D | H | E | k | dtype | dense GF/s | loop GF/s | torch GF/s | torch/loop speedup | torch vs dense | perm+unperm ms | alt (gather+dense combine) ms |"
    print("\n" + hdr)
    print("|" + "---|" * (hdr.count("|") - 1))
    for r in rows:
        print(f"| {r['T']} | {r['D']} | {r['H']} | {r['E']} | {r['k']} | {r['dtype']} | {r['dense_gflops']:.1f} | "
              f"{r['loop_gflops']:.1f} | {r['torch_gflops']:.1f} | {r['loop_s'] / r['torch_s']:.2f}x | "
              f"{r['torch_gflops'] / r['dense_gflops']:.2f} | {1e3 * r['permute_unpermute_s']:.2f} | "
              f"{1e3 * r['permute_alt_dense_combine_s']:.2f} |")
    out = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "gemm.json")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    meta = {"torch": torch.__version__, "threads": torch.get_num_threads(), "machine": platform.machine(),
            "note": "gflops counts fwd+bwd of both expert GEMMs incl. dispatch (sort + gather) and gated combine; medians"}
    with open(out, "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=1)
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
