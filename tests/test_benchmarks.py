"""The benchmark scripts run end to end at toy sizes (so they cannot rot) and write what they say."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def run(script, *args, tmp_path):
    env = dict(os.environ, PYTHONPATH=str(REPO))
    out = subprocess.run([sys.executable, str(REPO / "benchmarks" / script), *args, "--out", str(tmp_path / "r")],
                         capture_output=True, text=True, env=env, timeout=300, cwd=tmp_path)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return json.loads((tmp_path / "r.json").read_text()), (tmp_path / "r.md").read_text()


@pytest.mark.slow
def test_moe_layer_benchmark_toy_row(tmp_path):
    res, md = run("moe_layer.py", "--rows", "4,16,2,64,32", "--reps", "1", "--threads", "1", tmp_path=tmp_path)
    row = res["rows"][0]
    for name in ("dense", "moex[auto]", "moex[torch]", "moex[loop]", "naive", "deepspeed"):
        assert row["time_s"][name] > 0 and row["peak_bytes"][name] >= 0, name
        assert name == "deepspeed" or row["activation_bytes"][name] > 0, name
    # the dense MLP saves its (T, k*H) hidden layer: at least that many bytes
    assert row["activation_bytes"]["dense"] >= 64 * 2 * 16 * 4
    assert "| 4 | 16 | 2 | 64 | 32 |" in md


@pytest.mark.slow
def test_moe_profile_toy_row(tmp_path):
    res, md = run("moe_profile.py", "--rows", "4,16,2,64,32", "--steps", "1", tmp_path=tmp_path)
    cats = res["rows"][0]["by_category_s"]
    assert cats["moex"]["router GEMMs"] > 0 and cats["dense"].get("router GEMMs", 0.0) == 0.0
    assert cats["moex"]["gather / scatter"] > 0 and cats["dense"]["expert GEMMs"] > 0
    assert "| expert GEMMs |" in md


@pytest.mark.slow
def test_toy_superposition_resumes_from_its_cache(tmp_path):
    args = ("toy_superposition.py", "--n", "8", "--ratios", "2", "--base-ratio", "2", "--sparsities", "0.8",
            "--seeds", "1", "--steps", "5", "--batch", "32", "--families", "dense-relu,moex",
            "--cache", str(tmp_path / "cache"))
    res, md = run(*args, tmp_path=tmp_path)
    assert {r["family"] for r in res["rows"]} == {"dense-relu", "moex"}
    assert (tmp_path / "r.png").stat().st_size > 0 and "| 0.8 | 2 | moex | 1 |" in md
    cached = (tmp_path / "cache" / "cache.0.jsonl").read_text()
    res2, _ = run(*args, tmp_path=tmp_path)  # everything cached: nothing retrained, same numbers
    assert (tmp_path / "cache" / "cache.0.jsonl").read_text() == cached and res2["rows"] == res["rows"]


def test_chess_experiment_variants_have_equal_active_ffn_params():
    """Dense, MoE-X and Switch variants of the chess experiment differ only by the router's D x E per layer."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import chess_interp as ci

    from moex import config as C
    from moex.models.info import describe

    active = {n: describe(C.load(str(ci.RECIPE), ov + ["model.vocab_size=32"]))["params_active"]
              for n, ov in ci.VARIANTS.items()}
    D, E, L = 128, 8, 4
    assert active["dense-relu"] == active["dense-gelu"] == active["moex"]  # MoE-X's router has no parameters
    assert active["switch"] == active["dense-relu"] + L * D * E
    assert abs(active["monet-vd"] / active["dense-relu"] - 1) < 0.05  # + its routers, shared per 2 layers
    assert ci.max_steps() % 2 == 0 and ci.max_steps() // 2 % 200 == 0  # the upcycle start is a kept checkpoint


@pytest.mark.slow
def test_data_prep_benchmark_toy_sizes(tmp_path):
    res, md = run("data_prep.py", "--sizes", "200KB,400KB", "--workers", "1,2", "--tokenizer", "byte", tmp_path=tmp_path)
    rows = res["rows"]
    assert [(r["size_bytes"], r["workers"]) for r in rows] == [(200_000, 1), (200_000, 2), (400_000, 1), (400_000, 2)]
    assert rows[0]["tokens"] == rows[1]["tokens"] < rows[2]["tokens"] == rows[3]["tokens"]  # byte: tokens follow size
    assert all(r["peak_pss_bytes"] > 0 and r["processes"] >= 1 for r in rows)  # polled: short runs may end first
    assert "| 400 KB | 2 |" in md
