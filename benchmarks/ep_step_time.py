"""Training step time: 1 rank vs 2 ranks with expert parallelism (and pure data parallelism).

A chess-tiny-like model (recipes/chess-tiny.yaml: 4 layers, d=128, 8 experts,
top-2, d_expert=128, context 256; MoE-X and softmax top-k routers) trained through the real Trainer/DeepSpeed step
on the same global batch. Layouts on the same cores:

    1rank    one process, all threads, global batch B
    ep2      two processes (gloo), 1 thread each, B/2 each, parallel.ep_size=2
    dp2      two processes, 1 thread each, B/2 each, experts replicated

Prints a Markdown table and writes benchmarks/results/ep_step_time.json.
Times on a shared machine are noisy: runs are interleaved and repeated (best
reported); compare the ratios taken in one run.

    PYTHONPATH=. python benchmarks/ep_step_time.py [--steps 10] [--batch 16]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))  # dist_utils: spawn N gloo-connected ranks

from dist_utils import run_ranks  # noqa: E402

MODEL = ["model.n_layer=4", "model.n_head=4", "model.d_model=128", "model.block_size=256", "model.ffn=moe",
         "model.moe.num_experts=8", "model.moe.top_k=2", "model.moe.d_expert=128",
         "data.num_games=300", "train.progress=false", "train.eval_batches=0"]


def _time_steps(rank, world, out_dir, overrides, warmup, steps, threads):
    import torch

    from moex import config as C
    from moex.eval.balance import StatsAccumulator
    from moex.training.trainer import Trainer

    cfg = C.load(None, MODEL + [f"train.out_dir={out_dir}", "train.run_name=bench", f"data.cache_dir={out_dir}/cache",
                                f"train.threads={threads}", f"train.max_steps={warmup + steps}", *overrides])
    t = Trainer(cfg, log=lambda s: None)
    acc = StatsAccumulator()
    t.engine.train()
    for s in range(warmup):
        t._step(s, acc)
    if world > 1:
        torch.distributed.barrier()
    t0 = time.perf_counter()
    for s in range(warmup, warmup + steps):
        t._step(s, acc)  # includes the all-reduce of the logged loss: a sync point per step
    return (time.perf_counter() - t0) / steps


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=2, help="interleaved repeats; the best is reported")
    ap.add_argument("--batch", type=int, default=16, help="global batch (sequences of 256 tokens)")
    ap.add_argument("--zero", type=int, default=1, help="DeepSpeed ZeRO stage")
    ap.add_argument("--routers", default="moex,topk", help="comma-separated model.moe.router values")
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "ep_step_time.json"))
    args = ap.parse_args(argv)
    cores = os.cpu_count() or 1
    B = args.batch
    layouts = [
        ("1rank", 1, cores, [f"train.batch_size={B}"]),
        ("ep2", 2, max(1, cores // 2), [f"train.batch_size={B // 2}", "parallel.ep_size=2"]),
        ("dp2", 2, max(1, cores // 2), [f"train.batch_size={B // 2}"]),
    ]
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        for rep in range(args.repeats):  # interleaved, best of N: other load on the machine only adds time
            for router in args.routers.split(","):
                for name, world, threads, extra in layouts:
                    extra = extra + [f"deepspeed.zero_stage={args.zero}", f"model.moe.router={router}"]
                    per_rank = run_ranks(_time_steps, world, Path(tmp) / f"{router}-{name}", extra, args.warmup,
                                         args.steps, threads, timeout=900)
                    sec = max(per_rank)  # a step ends when the slowest rank ends it
                    row = rows.setdefault((router, name), {"router": router, "layout": name, "ranks": world,
                                                           "threads_per_rank": threads, "runs_ms": []})
                    row["runs_ms"].append(1e3 * sec)
    rows = list(rows.values())
    for r in rows:
        r["ms_per_step"] = min(r["runs_ms"])
        r["tokens_per_s"] = B * 256 / (r["ms_per_step"] / 1e3)
    for r in rows:
        base = next(b for b in rows if b["router"] == r["router"] and b["layout"] == "1rank")
        r["vs_1rank"] = r["ms_per_step"] / base["ms_per_step"]
    result = {"benchmark": "ep_step_time", "global_batch": B, "block_size": 256, "steps": args.steps,
              "warmup": args.warmup, "repeats": args.repeats, "zero_stage": args.zero, "model": MODEL, "cpu_cores": cores,
              "machine": platform.platform(), "results": rows}
    print(f"\nStep time, chess-tiny-like MoE model, global batch {B}x256 tokens, ZeRO-{args.zero}, {cores} cores\n")
    print("| router | layout | ranks | threads/rank | ms/step | tokens/s | vs 1 rank |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['router']} | {r['layout']} | {r['ranks']} | {r['threads_per_rank']} | {r['ms_per_step']:.0f} | "
              f"{r['tokens_per_s']:.0f} | {r['vs_1rank']:.2f}x |")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
