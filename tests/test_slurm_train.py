"""The real trainer through the sbatch scripts on the local Slurm cluster.

One uninterrupted 2-rank run is the reference; a run preempted mid-way
(SIGUSR1 to the batch shell, as `--signal=B:USR1@120` does before the time
limit) must checkpoint, requeue itself, resume and end with the very same
per-step losses; 2 nodes x 1 rank must match 1 node x 2 ranks too.

Jobs run in the test's tmp dir (`--chdir`; logs in its slurm-logs/, runs and
the data cache under it) so nothing lands in the repository. We poll squeue
instead of `sbatch --wait`, whose poll interval grows and returned ~30 s after
a 14 s job here.
"""
import json
import re
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.slurm_cluster import REPO

pytestmark = [pytest.mark.slurm, pytest.mark.slow]

RECIPE = str(REPO / "recipes" / "chess-tiny.yaml")
STEPS = 200  # 10-50 ms a step with 2 ranks: long enough to signal at step 20
TINY = [
    "model.n_layer=2", "model.d_model=32", "model.n_head=2", "model.block_size=32",
    "model.moe.d_expert=16", "data.num_games=60", "train.batch_size=4",
    "train.eval_batches=2", "train.progress=false", f"train.max_steps={STEPS}",
]


@dataclass
class Job:
    id: str
    log: Path
    run_dir: Path

    def text(self) -> str:
        return self.log.read_text() if self.log.exists() else "(no log yet)"

    def metrics(self) -> list:
        path = self.run_dir / "metrics.jsonl"
        if not path.exists():
            return []
        return [json.loads(ln) for ln in path.read_text().splitlines() if ln.strip()]


def submit(cluster, tmp: Path, script: str, *sbatch_opts: str) -> Job:
    (tmp / "slurm-logs").mkdir(parents=True, exist_ok=True)
    env = dict(cluster.env, MOEX_ROOT=str(REPO))
    out = cluster.run(["sbatch", "--parsable", f"--chdir={tmp}", *sbatch_opts,
                       str(REPO / "slurm" / script), RECIPE, *TINY,
                       f"train.out_dir={tmp}/runs", f"data.cache_dir={tmp}/cache"], env=env)
    job_id = out.stdout.strip().split(";")[0]
    return Job(job_id, tmp / "slurm-logs" / f"moex-train-{job_id}.out",
               tmp / "runs" / f"chess-tiny-{job_id}")


def wait_done(cluster, job: Job, timeout: float = 240) -> dict:
    """Poll until the job leaves the queue; return its final `scontrol show job` fields."""
    deadline = time.time() + timeout
    while cluster.run(["squeue", "-h", "-j", job.id, "-o", "%T"]).stdout.strip():
        if time.time() > deadline:
            cluster.run(["scancel", job.id])
            raise AssertionError(f"job {job.id} did not finish in {timeout} s:\n{job.text()}")
        time.sleep(0.5)
    # MinJobAge=60 in the local cluster's config keeps finished jobs visible
    show = cluster.run(["scontrol", "show", "job", "-o", job.id]).stdout
    return dict(re.findall(r"(\w+)=(\S+)", show))


def assert_finished(info: dict, job: Job) -> list:
    text = job.text()
    assert (info["JobState"], info["ExitCode"]) == ("COMPLETED", "0:0"), f"{info}\n{text}"
    assert "srun exited with 0" in text and "world 2" in text, text
    recs = job.metrics()
    assert [r["step"] for r in recs] == list(range(1, STEPS + 1)), text
    assert "val" in recs[-1], recs[-1]
    assert (job.run_dir / "config.yaml").exists()
    assert (job.run_dir / "checkpoints" / "latest").exists()
    return recs


@pytest.fixture(scope="module")
def reference(slurm_cluster, tmp_path_factory):
    """The uninterrupted run: 1 node x 2 ranks."""
    tmp = tmp_path_factory.mktemp("reference")
    job = submit(slurm_cluster, tmp, "train-single-node.sbatch", "--ntasks=2")
    t0 = time.time()
    info = wait_done(slurm_cluster, job)
    return job, info, time.time() - t0


def test_single_node_two_ranks_trains(reference):
    job, info, _ = reference
    recs = assert_finished(info, job)
    assert info["Restarts"] == "0" and info["NumTasks"] == "2"
    assert recs[-1]["val"]["loss"] < 3.0 < recs[0]["loss"], (recs[0], recs[-1])  # it learned


def test_preempt_requeue_resume_matches_uninterrupted(slurm_cluster, reference, tmp_path):
    ref_job, ref_info, _ = reference
    ref = assert_finished(ref_info, ref_job)
    job = submit(slurm_cluster, tmp_path, "train-single-node.sbatch", "--ntasks=2")
    deadline = time.time() + 120
    while len(job.metrics()) < 20:  # signal only once training is well under way
        assert time.time() < deadline, job.text()
        time.sleep(0.1)
    slurm_cluster.run(["scancel", "--batch", "--signal=USR1", job.id])  # = --signal=B:USR1@120
    info = wait_done(slurm_cluster, job)
    text = job.text()
    m = re.search(r"preempted: checkpoint at step (\d+) written", text)
    assert m, text
    stop = int(m.group(1))
    assert 20 <= stop < STEPS, text
    assert "requeueing job" in text and "restart=1" in text, text
    assert f"resumed from {job.run_dir / 'checkpoints'}" in text and f"(step {stop})" in text, text
    recs = assert_finished(info, job)
    assert info["Restarts"] == "1", info
    # bit-exact resume: every step, before and after the preemption, as uninterrupted
    assert [r["loss"] for r in recs] == [r["loss"] for r in ref], stop
    assert recs[-1]["val"]["loss"] == ref[-1]["val"]["loss"]


def test_two_nodes_one_rank_each_match_one_node(slurm_cluster, reference, tmp_path):
    if len(slurm_cluster.nodes) < 2:
        pytest.skip("the local cluster has one node (start.sh --nodes 2 for two)")
    ref_job, ref_info, _ = reference
    ref = assert_finished(ref_info, ref_job)
    job = submit(slurm_cluster, tmp_path, "train-multi-node.sbatch", "-N2", "--ntasks-per-node=1")
    info = wait_done(slurm_cluster, job)
    recs = assert_finished(info, job)
    assert info["NumNodes"] == "2" and "nodes=n[1-2]" in job.text(), info
    # the same 2-rank data-parallel job, only placed differently: same losses
    assert [r["loss"] for r in recs] == [r["loss"] for r in ref]


def test_scancel_checkpoints_and_is_not_requeued(slurm_cluster, tmp_path):
    """SIGTERM also makes the trainer checkpoint and exit 124, but a cancelled job
    must stay cancelled (it used to requeue itself and train on)."""
    job = submit(slurm_cluster, tmp_path, "train-single-node.sbatch", "--ntasks=2")
    deadline = time.time() + 120
    while len(job.metrics()) < 10:
        assert time.time() < deadline, job.text()
        time.sleep(0.1)
    slurm_cluster.run(["scancel", job.id])
    info = wait_done(slurm_cluster, job)
    text = job.text()
    assert (info["JobState"], info["Restarts"]) == ("CANCELLED", "0"), f"{info}\n{text}"
    assert "not requeueing" in text and "restart=1" not in text, text
    m = re.search(r"preempted: checkpoint at step (\d+) written", text)
    assert m and (job.run_dir / "checkpoints" / f"step-{int(m.group(1)):07d}").is_dir(), text
