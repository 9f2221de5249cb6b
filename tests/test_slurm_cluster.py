"""The local Slurm cluster itself, and the sbatch scripts' requeue path with a
stand-in program. Training through Slurm: test_slurm_train.py."""
import textwrap
import time

import pytest

from tests.slurm_cluster import REPO

pytestmark = [pytest.mark.slurm, pytest.mark.slow]  # each brings up a local cluster

PRINT_LAUNCH = ("from moex.parallel.launch import detect_launch; i = detect_launch(); "
                "print('rank', i.rank, i.local_rank, i.world_size, i.master_addr, "
                "i.master_port, i.launcher, flush=True)")


def test_srun_two_tasks(slurm_cluster):
    out = slurm_cluster.run(["srun", "-n2", "python", "-c",
                             "import os; print(os.environ['SLURM_PROCID'])"])
    assert sorted(out.stdout.split()) == ["0", "1"]


def test_sbatch_wait_detect_launch(slurm_cluster, tmp_path):
    nodes = min(2, len(slurm_cluster.nodes))
    script = tmp_path / "job.sh"
    script.write_text(textwrap.dedent(f"""\
        #!/bin/bash
        #SBATCH --nodes={nodes}
        #SBATCH --ntasks=2
        #SBATCH --output={tmp_path}/job-%j.out
        srun python -c "{PRINT_LAUNCH}"
        """))
    out = slurm_cluster.run(["sbatch", "--parsable", "--wait", str(script)], cwd=tmp_path)
    job_id = int(out.stdout.strip().split(";")[0])
    rows = sorted(ln.split()[1:] for ln in (tmp_path / f"job-{job_id}.out").read_text()
                  .splitlines() if ln.startswith("rank "))
    assert [r[0] for r in rows] == ["0", "1"]
    port = str(20000 + job_id % 20000)
    for rank, local, world, addr, p, launcher in rows:
        assert (world, p, launcher) == ("2", port, "slurm")
        # every rank agrees on one master; on the local cluster every node is 127.0.0.1
        assert addr in ("localhost", "127.0.0.1")
    assert {r[3] for r in rows} == {rows[0][3]}
    # one node: local ranks 0 and 1; two nodes: one task each, local rank 0
    assert sorted(r[1] for r in rows) == (["0", "0"] if nodes == 2 else ["0", "1"])


# A stand-in for `moex.cli` that keeps the trainer's preemption contract: on
# SIGUSR1 every rank "saves", meets the others (a file barrier), exits 124.
STAND_IN = textwrap.dedent("""\
    import os, signal, sys, time
    got = []
    signal.signal(signal.SIGUSR1, lambda s, f: got.append(s))
    rank, n = os.environ["SLURM_PROCID"], int(os.environ["SLURM_NTASKS"])
    restart = os.environ.get("SLURM_RESTART_COUNT", "0")
    d = os.environ["STAND_IN_DIR"]
    def barrier(tag):
        open(f"{d}/{tag}-{restart}-{rank}", "w").close()
        while sum(os.path.exists(f"{d}/{tag}-{restart}-{i}") for i in range(n)) < n:
            time.sleep(0.02)
    print("run", restart, rank, " ".join(sys.argv[1:]), flush=True)
    barrier("ready")
    if restart == "0":
        t = time.time()
        while not got and time.time() - t < 60:
            time.sleep(0.02)
        barrier("saved")
        sys.exit(124 if got else 1)
    print("resumed", rank, flush=True)
    """)


def test_preempt_requeue_resume(slurm_cluster, tmp_path):
    """USR1 to the batch shell -> forwarded to all ranks -> exit 124 -> scontrol
    requeue -> the same job id runs again with the same run name."""
    (tmp_path / "stand_in.py").write_text(STAND_IN)
    (tmp_path / "slurm-logs").mkdir()
    env = dict(slurm_cluster.env, STAND_IN_DIR=str(tmp_path), MOEX_ROOT=str(REPO),
               MOEX_CMD=f"python {tmp_path}/stand_in.py")
    nodes = min(2, len(slurm_cluster.nodes))
    script = "train-multi-node.sbatch" if nodes == 2 else "train-single-node.sbatch"
    run = slurm_cluster.run
    job = run(["sbatch", "--parsable", "--time=5", str(REPO / "slurm" / script),
               "recipes/chess-tiny.yaml", "train.max_steps=3"], cwd=tmp_path, env=env)
    job_id = job.stdout.strip().split(";")[0]
    log = tmp_path / "slurm-logs" / f"moex-train-{job_id}.out"
    deadline = time.time() + 60
    while not all((tmp_path / f"ready-0-{r}").exists() for r in range(2)):
        assert time.time() < deadline, log.read_text() if log.exists() else "no log"
        time.sleep(0.1)
    run(["scancel", "--batch", "--signal=USR1", job_id])  # what --signal=B:USR1@120 does
    while True:
        state = run(["squeue", "-h", "-j", job_id, "-o", "%T"]).stdout.strip()
        if not state:
            break
        assert time.time() < deadline, f"job {job_id} still {state}:\n{log.read_text()}"
        time.sleep(0.2)
    text = log.read_text()
    assert "requeueing job" in text, text
    assert sorted(ln for ln in text.splitlines() if ln.startswith("resumed")) == \
        ["resumed 0", "resumed 1"], text
    runs = [ln.split() for ln in text.splitlines() if ln.startswith("run ")]
    assert sorted(r[1:3] for r in runs) == [["0", "0"], ["0", "1"], ["1", "0"], ["1", "1"]]
    # both attempts train the same run directory: the resume contract
    assert {r[5] for r in runs} == {f"train.run_name=chess-tiny-{job_id}"}, runs
    assert "srun exited with 0" in text


def test_srun_gloo_rendezvous(slurm_cluster):
    """Plain srun (no MASTER_ADDR from an sbatch script): ranks find each other
    from SLURM_* alone, across both nodes when the cluster has two."""
    nodes = min(2, len(slurm_cluster.nodes))
    code = ("import torch, torch.distributed as dist\n"
            "from moex.parallel.launch import detect_launch, export_env\n"
            "i = detect_launch(); export_env(i)\n"
            "dist.init_process_group('gloo', rank=i.rank, world_size=i.world_size)\n"
            "t = torch.tensor([i.rank + 1.0]); dist.all_reduce(t)\n"
            "print('sum', i.rank, int(t.item()), i.launcher, flush=True)\n"
            "dist.destroy_process_group()\n")
    env = {k: v for k, v in slurm_cluster.env.items() if k not in ("MASTER_ADDR", "MASTER_PORT")}
    out = slurm_cluster.run(["srun", f"-N{nodes}", "-n2", "python", "-c", code], env=env,
                            timeout=120)
    assert sorted(ln for ln in out.stdout.splitlines() if ln.startswith("sum")) == \
        ["sum 0 3 slurm", "sum 1 3 slurm"], out.stdout + out.stderr
