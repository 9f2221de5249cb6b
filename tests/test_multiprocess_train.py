"""Pure data parallelism is exact: N ranks x batch B train like 1 rank x batch N*B.

Each rank reads its slice of the global batch and DeepSpeed averages the
gradients, so the weights, the logged (global-batch) losses and the validation
loss must match the single-process run up to float rounding. Launched the ways
users launch: `torchrun` and DeepSpeed's own `deepspeed` launcher (which passes
`--local_rank=N`). The Slurm launch is in test_slurm_train.py.
"""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from moex.parallel.launch import free_port

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
RECIPE = str(REPO / "recipes" / "chess-tiny.yaml")
# The Switch balance loss is a product of two batch means (f_i * P_i), so its
# gradient over one 2B batch differs from the average over two B batches: off
# here, because this test is about the data-parallel plumbing being exact.
TINY = [
    "model.n_layer=2", "model.d_model=32", "model.n_head=2", "model.block_size=32",
    "model.moe.d_expert=16", "model.moe.aux_loss_coef=0", "data.num_games=60",
    "train.max_steps=6", "train.eval_batches=0", "train.progress=false",
    "optim.warmup_steps=2",
]
B = 2  # per-rank batch; the single process gets 2 * B


def _env() -> dict:
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
           and not k.startswith("SLURM_")}
    # One thread per rank: the deepspeed launcher does not set it, and 2 ranks x
    # 2 OpenMP threads on 2 cores run ~100x slower. Also keeps the reductions'
    # order identical across the runs being compared.
    env.update(OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu",
               PYTHONPATH=os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p))
    return env


def _train(tmp: Path, name: str, launcher: list, batch: int) -> dict:
    """Run `moex train` under `launcher`; return {"losses": [...], "val": final val loss}."""
    args = launcher + ["train", RECIPE, *TINY, f"train.batch_size={batch}",
                       f"train.out_dir={tmp}/runs", f"train.run_name={name}",
                       f"data.cache_dir={tmp}/cache-{name}"]
    out = subprocess.run(args, cwd=tmp, env=_env(), capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, f"{args}\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
    recs = [json.loads(ln) for ln in (tmp / "runs" / name / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in recs] == list(range(1, 7))
    return {"losses": [r["loss"] for r in recs], "val": recs[-1]["val"]["loss"], "log": out.stdout}


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    """The reference: one process, global batch 2B."""
    return _train(tmp_path_factory.mktemp("single"), "single",
                  [sys.executable, "-m", "moex.cli"], 2 * B)


def _assert_same(single, multi):
    assert "world 2" in multi["log"]
    assert multi["losses"] == pytest.approx(single["losses"], rel=1e-5, abs=0), \
        "per-step losses of 2 ranks x B differ from 1 rank x 2B"
    assert multi["val"] == pytest.approx(single["val"], rel=1e-5, abs=0)
    # guard against a vacuous pass: the model did learn something in 6 steps
    assert single["losses"][-1] < single["losses"][0] - 0.02


def test_torchrun_two_ranks_match_one(single, tmp_path):
    multi = _train(tmp_path, "torchrun", [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
        "-m", "moex.cli"], B)
    _assert_same(single, multi)


@pytest.mark.skipif(shutil.which("deepspeed") is None, reason="deepspeed launcher not on PATH")
def test_deepspeed_launcher_two_ranks_match_one(single, tmp_path):
    # Without a hostfile the launcher runs local processes only: no ssh/pdsh needed.
    multi = _train(tmp_path, "deepspeed", [
        "deepspeed", "--num_gpus=2", f"--master_port={free_port()}", "--module", "moex.cli"], B)
    _assert_same(single, multi)
