"""MoE layer forward+backward speed and peak memory, as ratios taken in one run.

Shape key: T tokens, D model dim, E experts, H hidden units per expert, k experts
per token, A = T*k assignment rows.

Per configuration (E, H, k, T, D) it times one training-style step (forward,
loss = <y, g> + balance loss, backward) of

- ``dense``: a ReLU MLP with d_ff = k*H (the same active expert FLOPs),
- ``moex[<backend>]``: ``moex.models.moe.MoELayer`` (top-k router) per
  ``gemm_backend``: ``auto`` (the default: on CPU the fused expert MLP,
  ``moex.ops.expert_mlp``), and the unfused path on the ``torch`` and ``loop``
  grouped GEMMs; on CUDA also ``triton`` (unfused) and ``fused`` (the expert MLP on
  the gather-fused Triton kernels), reported in a second table,
- ``naive``: the layer as first written (argsort permute -> grouped_mm -> gate
  multiply on the (A, D) output -> index_add), kept here as the "before",
- ``deepspeed``: ``deepspeed.moe.layer.MoE`` at the same (E, k, D, H) with
  ``drop_tokens=False`` (its capacity becomes the largest expert load, so nothing
  is dropped; checked: its per-expert counts sum to T*k),
- ``matmul``: a plain (4096 x 1024) @ (1024 x 1024) product, the machine's own
  dense matmul rate measured in the same run.

Repetitions are interleaved (every variant once per round), and medians kept.
Memory, two numbers per variant: *activations* = bytes autograd saves for the
backward (unique storages, excluding parameters and the step's inputs x and g;
via ``torch.autograd.graph.saved_tensors_hooks``), the part that grows with
tokens; *peak* = the peak memory of one step above what was in use before it (CPU: the
resident-set high-water mark, reset through ``/proc/self/clear_refs``; CUDA:
``max_memory_allocated``). The peak includes
the parameter gradients, E/k times the dense MLP's by construction.
On CPU the script sets ``THP_MEM_ALLOC_ENABLE=1`` (torch's allocator then backs
large tensors with transparent huge pages; ``--no-thp`` to compare) before torch
is imported; it applies to every variant alike.

    PYTHONPATH=. python benchmarks/moe_layer.py [--quick] [--device cuda] [--threads N]

Writes benchmarks/results/moe_layer.{json,md} (``--out`` to change the stem).
"""

from __future__ import annotations

import os
import sys

if "--no-thp" not in sys.argv:
    os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")
os.environ.setdefault("DS_ACCELERATOR", "cpu" if "cuda" not in " ".join(sys.argv) else "cuda")

import argparse  # noqa: E402
import gc  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402

import torch  # noqa: E402
from torch import Tensor, nn  # noqa: E402

from moex.config import MoEConfig  # noqa: E402
from moex.models.mlp import DenseMLP  # noqa: E402
from moex.models.moe import MoELayer  # noqa: E402
from moex.ops import grouped_mm  # noqa: E402

# (E, H, k, T, D); the first three are the reference rows of benchmarks/README.md.
ROWS = [
    (8, 1024, 2, 8192, 512),
    (32, 256, 1, 8192, 512),
    (64, 128, 2, 16384, 512),
    (8, 512, 1, 2048, 1024),
    (32, 128, 2, 4096, 1024),
    (64, 256, 2, 32768, 512),
]
QUICK_ROWS = [(8, 1024, 2, 2048, 512), (32, 256, 1, 2048, 512), (64, 128, 2, 4096, 512)]
DS_MASK_LIMIT_BYTES = 3 << 30  # skip DeepSpeed where its T x E x C fp32 combine tensor alone exceeds this


# ----------------------------------------------------------------------------- variants
class NaiveMoE(nn.Module):
    """The first version of the layer: argsort, gather, grouped GEMMs, (A, D) gate multiply, index_add."""

    def __init__(self, moe: MoELayer):
        super().__init__()
        self.moe = moe

    def forward(self, x_TD: Tensor):
        m = self.moe
        r = m.router(x_TD, m.experts)
        expert_A = r.expert_A
        order_A = torch.argsort(expert_A, stable=True)
        counts_E = torch.bincount(expert_A, minlength=m.cfg.num_experts)
        x_AD = x_TD.index_select(0, r.token_A.index_select(0, order_A))
        h_AH = m.experts.act(grouped_mm(x_AD, m.experts.w1_EDH, counts_E, backend=m.cfg.gemm_backend))
        y_AD = grouped_mm(h_AH, m.experts.w2_EHD, counts_E, backend=m.cfg.gemm_backend)
        g_A = r.gate_A.index_select(0, order_A).unsqueeze(-1)
        y_TD = y_AD.new_zeros(x_TD.shape).index_add(0, r.token_A.index_select(0, order_A), y_AD * g_A)
        return y_TD, sum(r.aux_losses.values())


def _init_dist_once():
    import torch.distributed as dist

    if not dist.is_initialized():
        for k, v in dict(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT="29517").items():
            os.environ.setdefault(k, v)
        dist.init_process_group("gloo", rank=0, world_size=1)


def deepspeed_moe(E, H, k, D):
    """deepspeed.moe.layer.MoE, dropless (drop_tokens=False), deterministic top-2 (no 2nd-expert sampling)."""
    _init_dist_once()
    from deepspeed.moe.layer import MoE

    expert = nn.Sequential(nn.Linear(D, H, bias=False), nn.ReLU(), nn.Linear(H, D, bias=False))
    return MoE(D, expert, num_experts=E, ep_size=1, k=k, drop_tokens=False, use_rts=False,
               top2_2nd_expert_sampling=False)


def build_variants(E, H, k, D, device, dtype, backends, with_ds):
    """name -> (module, step(x, g) -> scalar loss) ; skipped -> reason."""
    out, skipped = {}, {}
    dense = DenseMLP(D, k * H, "relu").to(device, dtype)
    out["dense"] = (dense, lambda x, g: (dense(x).y * g).sum())
    cfg = dict(num_experts=E, top_k=k, d_expert=H, router="topk", activation="relu", aux_loss_coef=1e-2, z_loss_coef=0.0)
    for b in backends:
        m = MoELayer(D, MoEConfig(**cfg, gemm_backend=b)).to(device, dtype)

        def step(x, g, m=m):
            o = m(x)
            return (o.y * g).sum() + sum(o.aux_losses.values())

        out[f"moex[{b}]"] = (m, step)
    naive = NaiveMoE(MoELayer(D, MoEConfig(**cfg, gemm_backend="torch"))).to(device, dtype)

    def naive_step(x, g):
        y, aux = naive(x)
        return (y * g).sum() + aux

    out["naive"] = (naive, naive_step)
    if with_ds is not None:
        skipped["deepspeed"] = with_ds
    else:
        ds = deepspeed_moe(E, H, k, D).to(device, dtype)

        def ds_step(x, g):
            y, l_aux, counts = ds(x.unsqueeze(0))
            ds_step.counts = counts
            return (y.squeeze(0) * g).sum() + 1e-2 * l_aux

        out["deepspeed"] = (ds, ds_step)
    return out, skipped


# ----------------------------------------------------------------------------- measurement
def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def run_step(module, step, x, g):
    for p in module.parameters():
        p.grad = None
    x.grad = None
    step(x, g).backward()


def time_once(fn, device) -> float:
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t0


def _proc_status_bytes(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{key} not in /proc/self/status")


def peak_bytes(fn, device) -> int:
    """Peak memory of fn() above what was in use before it.

    CUDA: ``max_memory_allocated``. CPU (Linux, glibc): the process's resident-set
    high-water mark (``VmHWM``, reset by writing 5 to ``/proc/self/clear_refs``) above
    the resident set before the call, with blocks >= 64 KiB mmapped while it runs so
    that freeing a tensor returns its pages: it follows live tensor memory at page
    granularity. The minimum of three calls: huge-page backing adds up to a few 2 MiB
    pages of noise to a single reading.
    """
    if device.type == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    # glibc keeps freed heap memory resident and serves tensors below its (adaptive) mmap
    # threshold from it, which the resident set cannot see: hand free memory back to the OS,
    # and mmap every block >= 64 KiB for the duration (munmapped on free), then restore the
    # threshold glibc's adaptation reaches in a warm process (32 MiB).
    libc = _libc()
    libc.mallopt(_M_MMAP_THRESHOLD, 64 << 10)
    try:
        return min(_rss_peak_once(fn, libc) for _ in range(3))
    finally:
        libc.mallopt(_M_MMAP_THRESHOLD, 32 << 20)


def _rss_peak_once(fn, libc) -> int:
    gc.collect()
    libc.malloc_trim(0)
    base = _proc_status_bytes("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    fn()
    return _proc_status_bytes("VmHWM") - base


_M_MMAP_THRESHOLD = -3  # glibc mallopt parameter


def _libc():
    import ctypes

    return ctypes.CDLL("libc.so.6")


def saved_bytes(module, step, x, g) -> int:
    """Bytes autograd saves for the backward of one step (unique storages; not params, x or g)."""
    skip = {p.untyped_storage().data_ptr() for p in module.parameters()}
    skip |= {x.untyped_storage().data_ptr(), g.untyped_storage().data_ptr()}
    seen: dict[int, int] = {}

    def pack(t):
        st = t.untyped_storage()
        if st.data_ptr() not in skip:
            seen[st.data_ptr()] = st.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = step(x, g)
    del loss
    return sum(seen.values())


def bench_row(E, H, k, T, D, args, device, dtype):
    backends = ["auto", "torch", "loop"] + (["triton", "fused"] if device.type == "cuda" else [])
    T_, skip_ds = T, None
    C_est = 1.25 * T * k / E
    if args.no_deepspeed:
        skip_ds = "--no-deepspeed"
    elif T * E * C_est * 4 > DS_MASK_LIMIT_BYTES:
        skip_ds = f"its T x E x C combine tensor alone would be ~{T * E * C_est * 4 / 2**30:.1f} GiB"
    torch.manual_seed(0)
    variants, skipped = build_variants(E, H, k, D, device, dtype, backends, skip_ds)
    if device.type != "cuda":
        skipped["moex[triton]"] = ("Triton kernels need CUDA; on CPU they only run under TRITON_INTERPRET=1 "
                                   "(the Python interpreter, a correctness path tested in tests/test_triton_kernels.py)")
    x = torch.randn(T_, D, device=device, dtype=dtype, requires_grad=True)
    g = torch.randn(T_, D, device=device, dtype=dtype)
    a = torch.randn(4096, 1024, device=device, dtype=dtype)
    b = torch.randn(1024, 1024, device=device, dtype=dtype)
    fns = {name: (lambda m=m, s=s: run_step(m, s, x, g)) for name, (m, s) in variants.items()}
    fns["matmul"] = lambda: a @ b
    times: dict[str, list[float]] = {n: [] for n in fns}
    for name, fn in fns.items():  # warm-up (and DeepSpeed's dropless check)
        fn()
    if "deepspeed" in variants:
        counts = variants["deepspeed"][1].counts
        assert int(counts.sum()) == T_ * k, f"DeepSpeed dropped tokens: counts sum {int(counts.sum())} != {T_ * k}"
    slow_budget = args.slow_budget_s
    for rep in range(args.reps):
        for name, fn in fns.items():
            if rep >= 2 and name in ("moex[loop]", "deepspeed") and sum(times[name]) > slow_budget:
                continue  # slow references: at least 2 reps, then only while under budget
            times[name].append(time_once(fn, device))
    med = {n: statistics.median(v) for n, v in times.items()}
    mem = {n: peak_bytes(fn, device) for n, fn in fns.items() if n != "matmul"}
    act = {n: saved_bytes(m, s, x, g) for n, (m, s) in variants.items()}
    expert_flops = 3 * 2 * 2 * T_ * k * D * H  # fwd + 2 bwd GEMMs, two layers
    mm_flops_s = 2 * 4096 * 1024 * 1024 / med["matmul"]
    row = {"E": E, "H": H, "k": k, "T": T_, "D": D, "reps": {n: len(v) for n, v in times.items()},
           "time_s": med, "peak_bytes": mem, "activation_bytes": act, "skipped": skipped, "matmul_flops_s": mm_flops_s,
           "expert_flops": expert_flops,
           "flops_frac_of_matmul": {n: expert_flops / med[n] / mm_flops_s for n in variants}}
    return row


# ----------------------------------------------------------------------------- report
def fmt_ratio(row, name, ref):
    t = row["time_s"]
    return f"{t[name] / t[ref]:.2f}x" if name in t and ref in t else "—"


def markdown(rows, meta) -> str:
    lines = [f"MoE layer fwd+bwd on {meta['device_name']} ({meta['threads']} threads, {meta['dtype']}, "
             f"THP_MEM_ALLOC_ENABLE={meta['thp']}), medians of interleaved reps. Ratios: time / dense MLP "
             "of equal active FLOPs (d_ff = k*H); moex = the default layer (gemm_backend=auto: the fused "
             "expert MLP on CPU); 'vs DS' = DeepSpeed time / moex time; FLOP/s = expert GEMM FLOPs / step time "
             "as a fraction of the plain matmul rate measured in the same run; act = bytes saved for backward "
             "/ dense's; peak = peak memory during the step (CPU: resident-set high-water mark) / dense's (includes parameter gradients, "
             "E/k x dense's).", ""]
    hdr = ("| E | H | k | T | D | dense ms | moex | moex[torch] | naive | moex[loop] | deepspeed | moex vs DS | "
           "moex FLOP/s | dense FLOP/s | act dense MiB | act moex | act DS | peak dense MiB | peak moex | peak DS |")
    lines += [hdr, "|" + "---|" * (hdr.count("|") - 1)]
    main = "moex[auto]"
    for r in rows:
        t, p, f, a = r["time_s"], r["peak_bytes"], r["flops_frac_of_matmul"], r["activation_bytes"]
        vs_ds = f"{t['deepspeed'] / t[main]:.2f}x" if "deepspeed" in t else "skipped"
        pds = f"{p['deepspeed'] / p['dense']:.2f}x" if "deepspeed" in p else "—"
        ads = f"{a['deepspeed'] / a['dense']:.2f}x" if "deepspeed" in a else "—"
        lines.append(
            f"| {r['E']} | {r['H']} | {r['k']} | {r['T']} | {r['D']} | {1e3 * t['dense']:.1f} | "
            f"{fmt_ratio(r, main, 'dense')} | {fmt_ratio(r, 'moex[torch]', 'dense')} | {fmt_ratio(r, 'naive', 'dense')} | "
            f"{fmt_ratio(r, 'moex[loop]', 'dense')} | {fmt_ratio(r, 'deepspeed', 'dense')} | {vs_ds} | "
            f"{100 * f[main]:.0f}% | {100 * f['dense']:.0f}% | {a['dense'] / 2**20:.0f} | {a[main] / a['dense']:.2f}x | "
            f"{ads} | {p['dense'] / 2**20:.0f} | {p[main] / p['dense']:.2f}x | {pds} |")
    shown = {"dense", main, "moex[torch]", "naive", "moex[loop]", "deepspeed", "matmul"}
    extra = sorted({n for r in rows for n in r["time_s"]} - shown)  # e.g. moex[triton], moex[fused] on CUDA
    if extra:
        lines += ["", "| E | H | k | T | D | " + " | ".join(f"{n} / dense" for n in extra) + " |",
                  "|" + "---|" * (5 + len(extra))]
        lines += [f"| {r['E']} | {r['H']} | {r['k']} | {r['T']} | {r['D']} | "
                  + " | ".join(fmt_ratio(r, n, "dense") for n in extra) + " |" for r in rows]
    notes = sorted({f"{k}: {v}" for r in rows for k, v in r["skipped"].items()})
    if notes:
        lines += ["", "Skipped: " + "; ".join(notes) + "."]
    return "\n".join(lines) + "\n"


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--quick", action="store_true", help="three small rows (T=2k-4k)")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    ap.add_argument("--slow-budget-s", type=float, default=20.0, help="time budget per row for loop/DeepSpeed reps after 2")
    ap.add_argument("--rows", default="", help="E,H,k,T,D;E,H,k,T,D... (overrides the sweep)")
    ap.add_argument("--no-deepspeed", action="store_true")
    ap.add_argument("--no-thp", action="store_true", help="do not set THP_MEM_ALLOC_ENABLE=1")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "moe_layer"))
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    rows_cfg = QUICK_ROWS if args.quick else ROWS
    if args.rows:
        rows_cfg = [tuple(int(v) for v in r.split(",")) for r in args.rows.split(";")]
    rows = []
    for E, H, k, T, D in rows_cfg:
        t0 = time.perf_counter()
        rows.append(bench_row(E, H, k, T, D, args, device, dtype))
        r = rows[-1]
        print(f"E={E} H={H} k={k} T={T} D={D}: " + ", ".join(
            f"{n} {1e3 * v:.1f}ms" for n, v in r["time_s"].items()) + f"  ({time.perf_counter() - t0:.0f}s)", flush=True)
    meta = {"torch": torch.__version__, "threads": torch.get_num_threads(), "device": str(device),
            "device_name": torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or platform.machine(),
            "dtype": args.dtype, "thp": os.environ.get("THP_MEM_ALLOC_ENABLE", "0"), "reps": args.reps,
            "argv": sys.argv[1:]}
    try:
        import deepspeed

        meta["deepspeed"] = deepspeed.__version__
    except ImportError:
        pass
    write_results(args.out, {"meta": meta, "rows": rows}, markdown(rows, meta))


def write_results(stem: str, payload: dict, md: str) -> None:
    """Print the Markdown table and write STEM.json and STEM.md."""
    print("\n" + md)
    os.makedirs(os.path.dirname(stem), exist_ok=True)
    with open(stem + ".json", "w") as f:
        json.dump(payload, f, indent=1)
    with open(stem + ".md", "w") as f:
        f.write(md)
    print(f"wrote {stem}.json and .md")


if __name__ == "__main__":
    main()
