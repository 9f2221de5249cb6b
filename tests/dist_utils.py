"""Run a function on N real processes joined by a gloo process group (CPU).

``run_ranks(fn, world, *args)`` spawns `world` processes, initialises
torch.distributed in each through moex.training.distributed.init (DeepSpeed,
gloo, shm-comm JIT skipped) and returns ``[fn(rank, world, *args) for each rank]``.
`fn` must be a module-level function (it is pickled by reference). A failing
rank's traceback is raised in the caller.
"""

from __future__ import annotations

import io
import multiprocessing as mp
import os
import queue
import time
import traceback

from moex.parallel.launch import free_port

_DIST_ENV = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def _child(fn, rank: int, world: int, port: int, args, out) -> None:
    try:
        for k in _DIST_ENV:
            os.environ.pop(k, None)
        os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world),
                          LOCAL_WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
                          OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu")
        import torch

        torch.set_num_threads(1)  # N ranks on a 2-core machine; also fixes reduction order
        from moex.training import distributed

        distributed.init()
        result = fn(rank, world, *args)
        torch.distributed.barrier()
        # As bytes: torch's queue pickling shares tensors by file descriptor, which
        # dies with this process before the parent reads it.
        buf = io.BytesIO()
        torch.save(result, buf)
        out.put((rank, "ok", buf.getvalue()))
    except BaseException:  # noqa: BLE001 - reported to the parent verbatim
        out.put((rank, "error", traceback.format_exc()))


def run_ranks(fn, world: int, *args, timeout: float = 120.0) -> list:
    """fn(rank, world, *args) on `world` gloo-connected processes; their results by rank."""
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_child, args=(fn, r, world, port, args, out), daemon=True) for r in range(world)]
    for p in procs:
        p.start()
    results, errors = {}, []
    try:
        deadline = time.monotonic() + timeout
        while len(results) < world:
            try:
                rank, status, payload = out.get(timeout=1.0)
            except queue.Empty:
                dead = [r for r, p in enumerate(procs) if r not in results and p.exitcode is not None]
                if dead or time.monotonic() > deadline:
                    why = f"exited ({[procs[r].exitcode for r in dead]})" if dead else f"timed out after {timeout}s"
                    raise RuntimeError(f"ranks {dead or sorted(set(range(world)) - set(results))} {why} without a result")
                continue
            if status == "ok":
                import torch

                results[rank] = torch.load(io.BytesIO(payload), weights_only=False)
            else:
                errors.append(f"rank {rank} failed:\n{payload}")
                break  # the other ranks are likely blocked in a collective
    finally:
        for p in procs:
            p.join(timeout=10 if not errors else 1)
            if p.is_alive():
                p.kill()
    if errors:
        raise RuntimeError("\n".join(errors))
    return [results[r] for r in range(world)]
