"""Process setup for DeepSpeed on CPU or GPU, with or without a launcher."""

from __future__ import annotations

import os
from datetime import timedelta

import torch


def prepare_env() -> None:
    """Pick DeepSpeed's accelerator before it is imported (CPU unless CUDA is present)."""
    if "DS_ACCELERATOR" not in os.environ and not torch.cuda.is_available():
        os.environ["DS_ACCELERATOR"] = "cpu"


def init(skip_shm_comm: bool = True):
    """Initialise torch.distributed through DeepSpeed; returns the LaunchInfo."""
    prepare_env()
    from moex.parallel.launch import detect_launch, export_env

    info = detect_launch()
    export_env(info)
    import deepspeed

    if skip_shm_comm and not torch.cuda.is_available():
        # The CPU shm comm extension JIT-compiles for ~65 s; gloo is enough here.
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if not torch.distributed.is_initialized():
        # A finite timeout: if one rank dies, the others fail instead of hanging forever.
        timeout = timedelta(minutes=int(os.environ.get("MOEX_DIST_TIMEOUT_MIN", "10")))
        deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False, timeout=timeout)
    return info


def device_for(info) -> torch.device:
    if torch.cuda.is_available():
        torch.cuda.set_device(info.local_rank)
        return torch.device("cuda", info.local_rank)
    return torch.device("cpu")


def barrier() -> None:
    if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
        torch.distributed.barrier()
