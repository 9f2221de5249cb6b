"""The `moex` command line, end to end, in a subprocess like a user would run it."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def moex(*args, cwd, check=True):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    p = subprocess.run([sys.executable, "-m", "moex.cli", *args], cwd=cwd, env=env, capture_output=True, text=True)
    if check and p.returncode != 0:
        raise AssertionError(f"moex {' '.join(args)} failed ({p.returncode}):\n{p.stdout}\n{p.stderr}")
    return p


def test_config_error_is_clear_and_exit_code_2(tmp_path):
    p = moex("train", str(ROOT / "recipes/chess-tiny.yaml"), "model.moe.num_expert=3", cwd=tmp_path, check=False)
    assert p.returncode == 2
    assert "unknown config key 'model.moe.num_expert'" in p.stderr and "num_experts" in p.stderr


@pytest.mark.slow
def test_info_prints_param_counts(tmp_path):
    out = json.loads(moex("info", str(ROOT / "recipes/gpt2-small-moex.yaml"), cwd=tmp_path).stdout)
    assert out["params_total"] > out["params_active"] > 100_000_000


@pytest.mark.slow
def test_train_then_eval(tmp_path):
    over = ["model.n_layer=1", "model.d_model=32", "model.n_head=2", "model.block_size=32", "model.moe.d_expert=16",
            "data.num_games=40", "train.max_steps=4", "train.batch_size=4", "train.eval_interval=4",
            "train.eval_batches=1", "train.ckpt_interval=4", "train.progress=false", "train.log_interval=2"]
    p = moex("train", str(ROOT / "recipes/chess-tiny.yaml"), *over, cwd=tmp_path)
    assert "step      4  train" in p.stdout and "layer 0: CV" in p.stdout
    e = moex("eval", "runs/chess-tiny", "--max-batches", "2", cwd=tmp_path)
    assert "token ppl" in e.stdout and "layer 0: CV" in e.stdout
    rep = json.loads((tmp_path / "runs/chess-tiny/eval-val.json").read_text())
    assert rep["step"] == 4 and rep["tokens"] > 0 and len(rep["layers"][0]["tokens_per_expert"]) == 8
    # a second `train` on a finished run resumes and has nothing left to do
    p2 = moex("train", str(ROOT / "recipes/chess-tiny.yaml"), *over, cwd=tmp_path)
    assert "resumed from" in p2.stdout


@pytest.mark.slow
def test_cli_turns_on_huge_pages_before_torch_loads_unless_told_not_to():
    code = ("import os, sys; from moex import cli; cli.main(['info', sys.argv[1]]); "
            "import torch; print('THP=' + os.environ.get('THP_MEM_ALLOC_ENABLE', 'unset'))")
    for preset, want in ((None, "THP=1"), ("0", "THP=0")):
        env = {k: v for k, v in os.environ.items() if k != "THP_MEM_ALLOC_ENABLE"}
        env["PYTHONPATH"] = str(ROOT)
        if preset is not None:
            env["THP_MEM_ALLOC_ENABLE"] = preset
        p = subprocess.run([sys.executable, "-c", code, str(ROOT / "recipes/chess-tiny.yaml")], env=env,
                           capture_output=True, text=True, timeout=120)
        assert p.returncode == 0, p.stderr
        assert p.stdout.strip().endswith(want), p.stdout
