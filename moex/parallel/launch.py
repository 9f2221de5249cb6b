"""Work out who this process is in a distributed job, whatever launched it.

``detect_launch()`` reads the environment (and argv, for DeepSpeed's
``--local_rank``) and returns a :class:`LaunchInfo`; ``export_env()`` writes the
standard RANK/LOCAL_RANK/WORLD_SIZE/MASTER_ADDR/MASTER_PORT variables so that
``deepspeed.init_distributed(dist_backend="gloo")`` uses ``env://`` instead of
trying MPI discovery.

Precedence: torchrun-style env (RANK + WORLD_SIZE) > ``deepspeed`` launcher
(``--local_rank`` in argv) > Slurm step (``srun``: SLURM_STEP_ID + SLURM_PROCID)
> single process. A Slurm *batch* shell also has SLURM_PROCID=0 and
SLURM_NTASKS=N but no SLURM_STEP_ID; it is treated as a single process, since
the ranks only exist once ``srun`` starts them.
"""
from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
from dataclasses import dataclass
from typing import List, Mapping, MutableMapping, Optional, Sequence

__all__ = ["LaunchInfo", "detect_launch", "export_env", "strip_local_rank",
           "expand_hostlist", "free_port"]

LAUNCHERS = ("single", "torchrun", "deepspeed", "slurm")


@dataclass(frozen=True)
class LaunchInfo:
    """Identity of this process in the job (``launcher`` is one of LAUNCHERS)."""

    rank: int
    local_rank: int
    world_size: int
    master_addr: str
    master_port: int
    launcher: str

    def __post_init__(self) -> None:
        if self.launcher not in LAUNCHERS:
            raise ValueError(f"launcher must be one of {LAUNCHERS}, got {self.launcher!r}")
        if self.world_size < 1 or not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank {self.rank} out of range for world size {self.world_size}")
        if self.local_rank < 0:
            raise ValueError(f"local rank {self.local_rank} is negative")
        if not 0 < self.master_port < 65536:
            raise ValueError(f"master port {self.master_port} out of range")

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1


# ---------------------------------------------------------------- hostlists
_RANGE = re.compile(r"^(\d+)(?:-(\d+))?$")


def _split_top_level(text: str) -> List[str]:
    """Split on commas that are not inside [...] brackets."""
    parts, depth, cur = [], 0, []
    for ch in text:
        if ch == "[":
            depth += 1
        elif ch == "]":
            depth -= 1
            if depth < 0:
                raise ValueError(f"unbalanced ']' in hostlist {text!r}")
        if ch == "," and depth == 0:
            parts.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
    if depth:
        raise ValueError(f"unbalanced '[' in hostlist {text!r}")
    parts.append("".join(cur))
    return [p for p in parts if p]


def _expand_ranges(body: str, hostlist: str) -> List[str]:
    """'01-03,07' -> ['01', '02', '03', '07'] (zero padding of the lower bound kept)."""
    out = []
    for item in body.split(","):
        m = _RANGE.match(item.strip())
        if not m:
            raise ValueError(f"bad range {item!r} in hostlist {hostlist!r}")
        lo, hi = m.group(1), m.group(2) if m.group(2) is not None else m.group(1)
        if int(hi) < int(lo):
            raise ValueError(f"descending range {item!r} in hostlist {hostlist!r}")
        width = len(lo) if lo.startswith("0") else 0
        out.extend(str(i).zfill(width) for i in range(int(lo), int(hi) + 1))
    return out


def expand_hostlist(hostlist: str) -> List[str]:
    """Expand a Slurm hostlist: ``node[01-03,07],gpu5`` -> node01 node02 node03
    node07 gpu5; ``a-[1-2]-b`` -> a-1-b a-2-b; several bracket groups in one
    name expand as a cartesian product (``r[1-2]n[1-2]`` -> r1n1 r1n2 r2n1 r2n2),
    like ``scontrol show hostnames``. Order is preserved; duplicates are kept."""
    hosts: List[str] = []
    for part in _split_top_level(hostlist.strip()):
        names = [""]
        for literal, body in re.findall(r"([^\[]*)(?:\[([^\]]*)\])?", part):
            suffixes = _expand_ranges(body, hostlist) if body else [""]
            names = [n + literal + s for n in names for s in suffixes]
        hosts.extend(names)
    return hosts


# ---------------------------------------------------------------- helpers
def slurm_master_port(job_id: int) -> int:
    """The rendezvous port of a Slurm job: the same on every rank, different between concurrent jobs."""
    return 20000 + job_id % 20000


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _int(env: Mapping[str, str], key: str) -> int:
    try:
        return int(env[key])
    except KeyError:
        raise ValueError(f"{key} is not set") from None
    except ValueError:
        raise ValueError(f"{key}={env[key]!r} is not an integer") from None


def _local_rank_arg(argv: Sequence[str]) -> Optional[int]:
    for i, arg in enumerate(argv):
        for flag in ("--local_rank", "--local-rank"):
            if arg.startswith(flag + "="):
                return int(arg.split("=", 1)[1])
            if arg == flag and i + 1 < len(argv):
                return int(argv[i + 1])
    return None


def strip_local_rank(argv: Sequence[str]) -> List[str]:
    """argv without ``--local_rank=N`` / ``--local_rank N`` (and the
    ``--local-rank`` spelling), which launchers append and CLIs do not expect."""
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg in ("--local_rank", "--local-rank"):
            skip = True
        elif not arg.startswith(("--local_rank=", "--local-rank=")):
            out.append(arg)
    return out


def _node_addr(node: str) -> str:
    """An address for a Slurm node name: the name if it resolves, else the
    node's NodeAddr from scontrol (local multi-slurmd clusters use names like
    n1 that only Slurm knows), else the name unchanged."""
    try:
        socket.getaddrinfo(node, None)
        return node
    except OSError:
        pass
    if shutil.which("scontrol"):
        try:
            out = subprocess.run(["scontrol", "show", "node", "-o", node], capture_output=True,
                                 text=True, timeout=10).stdout
            m = re.search(r"\bNodeAddr=(\S+)", out)
            if m:
                return m.group(1)
        except (OSError, subprocess.SubprocessError):
            pass
    return node


# ---------------------------------------------------------------- detection
def detect_launch(env: Optional[Mapping[str, str]] = None,
                  argv: Optional[Sequence[str]] = None) -> LaunchInfo:
    """Return this process's :class:`LaunchInfo` (see the module docstring for
    the precedence of launchers). ``env``/``argv`` default to os.environ/sys.argv."""
    env = os.environ if env is None else env
    argv = sys.argv if argv is None else argv
    ds_local = _local_rank_arg(argv)

    if ds_local is not None:  # deepspeed launcher: --local_rank=N plus env
        world = _int(env, "WORLD_SIZE") if "WORLD_SIZE" in env else 1
        rank = _int(env, "RANK") if "RANK" in env else ds_local
        return LaunchInfo(rank, ds_local, world, env.get("MASTER_ADDR", "127.0.0.1"),
                          _int(env, "MASTER_PORT") if "MASTER_PORT" in env else 29500,
                          "deepspeed")

    if "RANK" in env and "WORLD_SIZE" in env:  # torchrun (or any env:// launcher)
        rank = _int(env, "RANK")
        local = _int(env, "LOCAL_RANK") if "LOCAL_RANK" in env else 0
        if "MASTER_ADDR" not in env or "MASTER_PORT" not in env:
            raise ValueError("RANK/WORLD_SIZE are set but MASTER_ADDR/MASTER_PORT are not")
        return LaunchInfo(rank, local, _int(env, "WORLD_SIZE"), env["MASTER_ADDR"],
                          _int(env, "MASTER_PORT"), "torchrun")

    if "SLURM_STEP_ID" in env and "SLURM_PROCID" in env:  # a task of an srun step
        world_key = "SLURM_STEP_NUM_TASKS" if "SLURM_STEP_NUM_TASKS" in env else "SLURM_NTASKS"
        nodes_key = "SLURM_STEP_NODELIST" if "SLURM_STEP_NODELIST" in env else "SLURM_JOB_NODELIST"
        if "MASTER_ADDR" in env:  # the sbatch scripts compute it once for all ranks
            addr = env["MASTER_ADDR"]
        else:
            if nodes_key not in env:
                raise ValueError("Slurm step without SLURM_STEP_NODELIST/SLURM_JOB_NODELIST")
            addr = _node_addr(expand_hostlist(env[nodes_key])[0])
        if "MASTER_PORT" in env:
            port = _int(env, "MASTER_PORT")
        else:  # same on every rank, different between concurrent jobs
            port = slurm_master_port(_int(env, "SLURM_JOB_ID"))
        return LaunchInfo(_int(env, "SLURM_PROCID"),
                          _int(env, "SLURM_LOCALID") if "SLURM_LOCALID" in env else 0,
                          _int(env, world_key), addr, port, "slurm")

    addr = env.get("MASTER_ADDR", "127.0.0.1")
    port = _int(env, "MASTER_PORT") if "MASTER_PORT" in env else free_port()
    return LaunchInfo(0, 0, 1, addr, port, "single")


def export_env(info: LaunchInfo,
               env: Optional[MutableMapping[str, str]] = None) -> MutableMapping[str, str]:
    """Write RANK/LOCAL_RANK/WORLD_SIZE/MASTER_ADDR/MASTER_PORT (into os.environ
    by default) so torch/DeepSpeed ``env://`` initialisation finds them."""
    env = os.environ if env is None else env
    env.update({"RANK": str(info.rank), "LOCAL_RANK": str(info.local_rank),
                "WORLD_SIZE": str(info.world_size), "MASTER_ADDR": info.master_addr,
                "MASTER_PORT": str(info.master_port)})
    return env
