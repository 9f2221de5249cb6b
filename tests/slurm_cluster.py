"""Reusable access to the local Slurm cluster (slurm/local-cluster) for tests.

``pytest_fixture = slurm_cluster`` in a test module (or ``from tests.slurm_cluster
import slurm_cluster``) gives a :class:`SlurmCluster`. A running cluster is used
as it is; otherwise start.sh brings one up with MOEX_SLURM_NODES nodes (default
2). Skips, with the reason, where Slurm cannot be had (not root, no apt-get, apt
failing); any other start-up failure fails the test. A cluster the session
started is stopped when the session ends (MOEX_KEEP_SLURM=1 keeps it); one that
was already running is left alone.
"""
from __future__ import annotations

import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List

import pytest

REPO = Path(__file__).resolve().parents[1]
START = REPO / "slurm" / "local-cluster" / "start.sh"
STOP = REPO / "slurm" / "local-cluster" / "stop.sh"
RUN_DIR = Path(os.environ.get("MOEX_SLURM_RUN_DIR", "/var/tmp/moex-slurm"))


@dataclass
class SlurmCluster:
    """A usable cluster: ``env`` runs client commands against it and lets jobs
    import moex; ``nodes`` are its idle node names."""

    env: Dict[str, str]
    nodes: List[str]
    started: bool = False  # brought up by this process (so it stops it too)

    def run(self, args: List[str], timeout: float = 60, **kw) -> subprocess.CompletedProcess:
        """Run a client command (srun, sbatch, ...); raise with its output on failure."""
        kw.setdefault("env", self.env)
        out = subprocess.run(args, capture_output=True, text=True, timeout=timeout, **kw)
        if out.returncode != 0:
            raise AssertionError(f"{args} exited {out.returncode}\n{out.stdout}\n{out.stderr}")
        return out


def _env() -> Dict[str, str]:
    # a test runner started by torchrun/srun must not hand its identity to the jobs
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    conf = RUN_DIR / "slurm.conf"
    if conf.exists():
        env["SLURM_CONF"] = str(conf)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)
    env.setdefault("DS_ACCELERATOR", "cpu")
    return env


def _idle_nodes(env: Dict[str, str]) -> List[str]:
    if shutil.which("sinfo") is None:
        return []
    out = subprocess.run(["sinfo", "-h", "-N", "-o", "%N %t"], env=env, capture_output=True,
                         text=True, timeout=10)
    if out.returncode != 0:
        return []
    return [ln.split()[0] for ln in out.stdout.splitlines() if ln.split()[1:] == ["idle"]]


def ensure_cluster() -> SlurmCluster:
    """Use the running local cluster or start one; pytest.skip when impossible."""
    nodes = _idle_nodes(_env())
    if not nodes:
        if os.geteuid() != 0:
            pytest.skip("no local Slurm cluster running and not root (start.sh needs root)")
        if shutil.which("slurmctld") is None and shutil.which("apt-get") is None:
            pytest.skip("Slurm not installed and apt-get not available")
        env = dict(os.environ, MOEX_SLURM_NODES=os.environ.get("MOEX_SLURM_NODES", "2"))
        out = subprocess.run([str(START)], env=env, capture_output=True, text=True, timeout=600)
        if out.returncode != 0:
            if "apt-get" in out.stderr:
                pytest.skip(f"could not install Slurm: {out.stderr.strip()}")
            raise AssertionError(f"start.sh failed:\n{out.stdout}\n{out.stderr}")
        nodes = _idle_nodes(_env())
        assert nodes, "start.sh succeeded but sinfo shows no idle node"
        return SlurmCluster(env=_env(), nodes=nodes, started=True)
    return SlurmCluster(env=_env(), nodes=nodes)


def stop_cluster(cluster: SlurmCluster) -> None:
    """Stop a cluster this process started (slurmctld and every slurmd); keep munged."""
    if cluster.started and os.environ.get("MOEX_KEEP_SLURM") != "1":
        subprocess.run([str(STOP)], capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="session")
def slurm_cluster():
    """Session fixture around :func:`ensure_cluster`; stops what it started at the end."""
    cluster = ensure_cluster()
    yield cluster
    stop_cluster(cluster)
