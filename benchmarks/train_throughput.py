"""Training-step throughput (tokens/s) and peak memory: dense vs top-k MoE vs MoE-X GPTs.

Shape key: B batch, T context, D model dim, E experts, H hidden units per expert,
k experts per token.

All models are ``moex.models.GPT`` with the same attention stack and equal active
FFN parameters per token (dense d_ff = k*H, ReLU), trained with plain
``torch.optim.AdamW``; one step = forward, loss (cross-entropy + aux losses),
backward, optimizer step, zero_grad. Reps are interleaved across models and the
median kept. Peak memory: torch bytes allocated during one step above the bytes
live before it (torch.profiler memory events on CPU; max_memory_allocated on CUDA),
so it includes the AdamW state allocated on the first step only if measured there
(it is not: the step measured is a later one).

    PYTHONPATH=. python benchmarks/train_throughput.py [--quick] [--device cuda] [--threads N]

Writes benchmarks/results/train_throughput.{json,md}.
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from moe_layer import peak_bytes, sync, write_results  # noqa: E402  (also sets THP_MEM_ALLOC_ENABLE before torch loads)

import argparse  # noqa: E402
import platform  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402

import torch  # noqa: E402

from moex.config import ModelConfig, MoEConfig  # noqa: E402
from moex.models.transformer import GPT, param_counts  # noqa: E402

# (E, H, k): a coarse and a fine-grained expert layout
SETS = [(8, 256, 2), (64, 32, 2)]


def model_cfgs(E, H, k, args) -> dict[str, ModelConfig]:
    base = dict(vocab_size=256, n_layer=args.layers, n_head=4, d_model=args.d_model, block_size=args.ctx,
                pos_emb="rope", mlp_activation="relu", d_ff=k * H)
    moe = dict(num_experts=E, top_k=k, d_expert=H, activation="relu", aux_loss_coef=1e-2, gemm_backend=args.backend)
    return {
        "dense": ModelConfig(**base, ffn="dense"),
        f"topk E{E}k{k}": ModelConfig(**base, ffn="moe", moe=MoEConfig(**moe, router="topk", z_loss_coef=1e-3)),
        f"moex E{E}k{k}": ModelConfig(**base, ffn="moe", moe=MoEConfig(**moe, router="moex")),
    }


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--d-model", type=int, default=256)
    ap.add_argument("--ctx", type=int, default=256)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--backend", default="auto")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "train_throughput"))
    args = ap.parse_args()
    if args.quick:
        args.layers, args.batch, args.reps = 2, 4, 3
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    rows = []
    for E, H, k in SETS:
        steps, mems, info = {}, {}, {}
        for name, cfg in model_cfgs(E, H, k, args).items():
            torch.manual_seed(0)
            model = GPT(cfg).to(device)
            opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
            idx = torch.randint(0, 256, (args.batch, args.ctx + 1), device=device)

            def step(model=model, opt=opt, idx=idx):
                out = model(idx[:, :-1], idx[:, 1:])
                out.loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)

            step()  # allocates AdamW state
            steps[name] = step
            info[name] = param_counts(model)
        times = {n: [] for n in steps}
        for _ in range(args.reps):
            for n, fn in steps.items():
                sync(device)
                t0 = time.perf_counter()
                fn()
                sync(device)
                times[n].append(time.perf_counter() - t0)
        for n, fn in steps.items():
            mems[n] = peak_bytes(fn, device)
        tokens = args.batch * args.ctx
        for n in steps:
            med = statistics.median(times[n])
            rows.append({"set": f"E={E} H={H} k={k}", "model": n, "params": info[n], "step_s": med,
                         "tokens_per_s": tokens / med, "peak_bytes": mems[n],
                         "vs_dense_time": med / statistics.median(times["dense"]),
                         "vs_dense_peak": mems[n] / mems["dense"]})
            print(f"E={E} H={H} k={k} {n}: {tokens / med:.0f} tok/s, {mems[n] / 2**20:.0f} MiB", flush=True)
    meta = {"torch": torch.__version__, "threads": torch.get_num_threads(), "device": str(device),
            "device_name": torch.cuda.get_device_name() if device.type == "cuda" else platform.machine(),
            "thp": os.environ.get("THP_MEM_ALLOC_ENABLE", "0"), "layers": args.layers, "d_model": args.d_model,
            "ctx": args.ctx, "batch": args.batch, "reps": args.reps, "backend": args.backend, "argv": sys.argv[1:]}
    lines = [f"Training step (fwd + bwd + AdamW), GPT {args.layers} layers, d_model {args.d_model}, context {args.ctx}, "
             f"batch {args.batch}, on {meta['device_name']} ({meta['threads']} threads, fp32, "
             f"THP_MEM_ALLOC_ENABLE={meta['thp']}); every FFN is dense (d_ff = k*H) or MoE; medians of "
             "interleaved reps. Peak = peak memory of a step above what was in use before it (CPU: resident-set high-water mark; includes gradients and AdamW state of the MoE's E/k x more expert parameters).", "",
             "| experts | model | params total / active | tokens/s | step time vs dense | peak MiB | peak vs dense |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['set']} | {r['model']} | {r['params']['total'] / 1e6:.2f}M / {r['params']['active'] / 1e6:.2f}M | "
                     f"{r['tokens_per_s']:.0f} | {r['vs_dense_time']:.2f}x | {r['peak_bytes'] / 2**20:.0f} | "
                     f"{r['vs_dense_peak']:.2f}x |")
    write_results(args.out, {"meta": meta, "rows": rows}, "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
