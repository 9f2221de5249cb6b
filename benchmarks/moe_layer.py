"""MoE layer forward+backward time vs an equal-active-FLOP dense MLP and DeepSpeed's MoE layer.

    python benchmarks/moe_layer.py [--quick] [--reps 5] [--device cpu|cuda]

Rows: the moex MoE layer per grouped-GEMM backend, the loop reference, a dense
MLP with d_ff = k*H (same active FLOPs), and `deepspeed.moe.layer.MoE` at the
same (E, k, D, H) with `drop_tokens=False` (its capacity grows to the busiest
expert, so nothing is dropped). Timings are medians of interleaved repetitions
(ABAB...) in one run; the table reports ratios, plus achieved FLOP/s as a share
of this machine's dense matmul FLOP/s measured in the same run. Peak memory is
reported on CUDA only (torch has no allocator statistics on CPU).
Writes benchmarks/results/moe_layer.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch

os.environ.setdefault("DS_ACCELERATOR", "cpu" if not torch.cuda.is_available() else "cuda")

CONFIGS = [  # (T tokens, D, E, H, k)
    (8192, 512, 8, 1024, 2),
    (8192, 512, 32, 256, 1),
    (16384, 512, 64, 128, 2),
]


def moex_layer(D, E, H, k, backend):
    from moex.config import MoEConfig
    from moex.models.moe import MoELayer

    return MoELayer(D, MoEConfig(num_experts=E, top_k=k, d_expert=H, router="topk", activation="relu",
                                 gemm_backend=backend, aux_loss_coef=0.0, z_loss_coef=0.0))


def dense_mlp(D, E, H, k):
    from moex.models.mlp import DenseMLP

    return DenseMLP(D, k * H, "relu")


def deepspeed_layer(D, E, H, k):
    import deepspeed
    from deepspeed.moe.layer import MoE

    class Expert(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fc, self.proj = torch.nn.Linear(D, H, bias=False), torch.nn.Linear(H, D, bias=False)

        def forward(self, x):
            return self.proj(torch.relu(self.fc(x)))

    if not torch.distributed.is_initialized():
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT="29555")
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
        deepspeed.init_distributed(dist_backend="gloo" if not torch.cuda.is_available() else "nccl",
                                   auto_mpi_discovery=False)
    layer = MoE(hidden_size=D, expert=Expert(), num_experts=E, ep_size=1, k=k, drop_tokens=False, use_rts=False)
    layer.set_deepspeed_parallelism()
    return layer


def step_fn(module, x, kind):
    def run():
        x.grad = None
        out = module(x)
        y = out.y if kind in ("moex", "dense") else out[0]
        y.backward(torch.ones_like(y))  # materialised upstream gradient
    return run


def bench(fns: dict, reps: int) -> dict[str, float]:
    times = {k: [] for k in fns}
    for f in fns.values():
        f()  # warm-up (and backend probing)
    for _ in range(reps):
        for name, f in fns.items():  # interleaved so drift hits every row alike
            t0 = time.perf_counter()
            f()
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            times[name].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def matmul_flops(T, D, F, reps, device) -> float:
    a, b = torch.randn(T, D, device=device), torch.randn(D, F, device=device)
    a @ b
    t = []
    for _ in range(reps):
        t0 = time.perf_counter()
        a @ b
        t.append(time.perf_counter() - t0)
    return 2 * T * D * F / statistics.median(t)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="a quarter of the tokens")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--no-deepspeed", action="store_true")
    args = ap.parse_args()
    torch.manual_seed(0)
    rows = []
    backends = ["torch", "loop"] + (["triton"] if args.device == "cuda" else [])
    for T, D, E, H, k in CONFIGS:
        T = T // 4 if args.quick else T
        x = torch.randn(T, D, device=args.device, requires_grad=True)
        mods = {f"moex[{b}]": ("moex", moex_layer(D, E, H, k, b)) for b in backends}
        mods["dense"] = ("dense", dense_mlp(D, E, H, k))
        if not args.no_deepspeed:
            mods["deepspeed"] = ("ds", deepspeed_layer(D, E, H, k))
        fns = {name: step_fn(m.to(args.device), x, kind) for name, (kind, m) in mods.items()}
        t = bench(fns, args.reps)
        flops = 6 * T * k * D * H * 2  # fwd+bwd of two GEMMs over T*k assignments
        peak = matmul_flops(T, D, k * H, args.reps, args.device)
        row = {"T": T, "D": D, "E": E, "H": H, "k": k, "seconds": t, "matmul_flops": peak,
               "vs_dense": {n: t[n] / t["dense"] for n in t},
               "vs_deepspeed": {n: t[n] / t["deepspeed"] for n in t} if "deepspeed" in t else {},
               "flops_share": {n: flops / t[n] / peak for n in t}}
        rows.append(row)
        print(f"T={T} D={D} E={E} H={H} k={k}: " + "  ".join(f"{n} {1e3 * s:.0f} ms" for n, s in t.items()), flush=True)
    names = list(rows[0]["seconds"])
    md = ["| config (T, D, E, H, k) | " + " | ".join(f"{n} / dense" for n in names) + " | moex[torch] vs DeepSpeed "
          "| moex[torch] FLOP/s share |", "|---|" + "---:|" * (len(names) + 2)]
    for r in rows:
        vs_ds = r["vs_deepspeed"].get("moex[torch]")
        md.append(f"| {r['T']}, {r['D']}, {r['E']}, {r['H']}, {r['k']} | "
                  + " | ".join(f"{r['vs_dense'][n]:.2f}x" for n in names)
                  + f" | {'–' if vs_ds is None else f'{1 / vs_ds:.2f}x faster'} | {r['flops_share']['moex[torch]']:.0%} |")
    machine = {"device": args.device, "cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
               "torch": torch.__version__}
    text = "\n".join(md) + f"\n\nMachine: {machine}. Ratios of fwd+bwd time (lower is better), medians of {args.reps} interleaved repetitions.\n"
    print(text)
    out = Path(__file__).resolve().parent / "results"
    out.mkdir(exist_ok=True)
    suffix = "" if not args.quick else "_quick"
    (out / f"moe_layer{suffix}.json").write_text(json.dumps({"machine": machine, "rows": rows}, indent=2))
    (out / f"moe_layer{suffix}.md").write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
