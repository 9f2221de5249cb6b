"""`moex compare`: matched active parameters, and a real 2-variant smoke run with its report."""

import json
from pathlib import Path

import pytest
import yaml

from moex import config as C
from moex.compare.command import compare
from moex.compare.report import markdown_table, summarise
from moex.compare.runner import is_done
from moex.compare.variants import VARIANTS, variant_overrides
from moex.models.info import describe


@pytest.mark.parametrize("name", list(VARIANTS))
def test_variants_match_dense_active_ffn_params(name):
    base = ["model.n_layer=2", "model.d_model=32", "model.n_head=2", "model.block_size=16", "model.d_ff=128",
            "model.vocab_size=32"]
    cfg = C.load(None, base + variant_overrides(name, 128))
    m = cfg.model
    per_token_hidden = {  # hidden units each token actually uses, per layer
        "dense": lambda: m.d_ff,
        "moe": lambda: m.moe.top_k * m.moe.d_expert,
        "monet": lambda: m.monet.num_heads * m.monet.top_k * m.monet.d_expert,
        "peer": lambda: m.peer.num_heads * m.peer.top_k,
    }[m.ffn]()
    assert per_token_hidden == 128
    d = describe(cfg)
    dense = describe(C.load(None, base + variant_overrides("dense-relu", 128)))
    # active params differ from dense only by routing parameters (gate, Monet routers, PEER query/keys)
    overhead = d["params_active"] - dense["params_active"]
    assert 0 <= overhead <= 2 * (32 * 16 * 2 * 2 + 32 * 32 * 16 + 2 * 16 * 32 * 16)


def test_summary_and_markdown_with_extra_columns():
    res = {"loss": 1.5, "ppl": 4.48, "train": {"tokens_per_s": 1000.0, "steps": 3},
           "params": {"params_total": 10, "params_active": 5},
           "layers": [{"layer": 0, "active_frac": 0.5},
                      {"layer": 1, "cv": 0.2, "maxvio": 0.4, "dropped_frac": 0.0, "router_entropy": 1.0,
                       "active_frac": 0.1, "tokens_per_expert": [1.0, 2.0]}]}
    row = summarise("topk2", res)
    assert row["cv"] == 0.2 and row["active_frac"] == pytest.approx(0.3)
    md = markdown_table([row], {"coverage": {"topk2": 0.42}})
    lines = md.splitlines()
    assert lines[0].count("|") == lines[2].count("|") and "coverage" in lines[0] and "0.420" in lines[2]


def tiny_recipe(tmp_path, *, block_size: int, steps: int, batch_size: int, eval_batches: int) -> Path:
    """A one-layer dense recipe on 40 generated games that trains `steps` steps and checkpoints at the end."""
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({
        "model": {"n_layer": 1, "n_head": 2, "d_model": 16, "block_size": block_size, "ffn": "dense", "d_ff": 32},
        "data": {"source": "chess_random", "num_games": 40, "cache_dir": str(tmp_path / "cache")},
        "train": {"max_steps": steps, "batch_size": batch_size, "eval_interval": steps, "eval_batches": eval_batches,
                  "log_interval": 1, "ckpt_interval": steps, "threads": 1},
        "optim": {"warmup_steps": 1},
    }))
    return recipe


@pytest.mark.slow
def test_two_variant_smoke_run_writes_report_and_resumes(tmp_path):
    recipe = tiny_recipe(tmp_path, block_size=32, steps=3, batch_size=4, eval_batches=2)
    out = tmp_path / "cmp"
    extra = lambda name, run_dir, res: {"ckpt_step": res["step"]}
    payload = compare(str(recipe), ["dense-relu", "topk2"], out, [], extra=extra, log=lambda *_: None)
    rows = {r["variant"]: r for r in payload["rows"]}
    assert set(rows) == {"dense-relu", "topk2"}
    for r in rows.values():
        assert 0 < r["val_loss"] < 10 and r["ppl"] > 1 and r["tokens_per_s"] > 0 and r["ckpt_step"] == 3
        assert r["params_total"] >= r["params_active"] > 0
    assert rows["topk2"]["cv"] is not None and rows["dense-relu"]["cv"] is None
    assert json.loads((out / "compare.json").read_text())["rows"] == payload["rows"]
    md = (out / "compare.md").read_text()
    assert md.count("| dense-relu |") == 1 and "| topk2 |" in md and "ckpt_step" in md
    assert (out / "loss_curves.png").stat().st_size > 0 and (out / "load_topk2.png").exists()
    assert is_done(out, "topk2", 3)
    log = (out / "logs" / "topk2.log").read_text()
    compare(str(recipe), ["topk2"], out, [], log=lambda *_: None)  # finished: not retrained
    assert (out / "logs" / "topk2.log").read_text() == log


ROOT = Path(__file__).resolve().parents[1]
SHARED_PGN = ROOT.parent / "shared/data/chess/games.pgn"


@pytest.mark.slow
@pytest.mark.skipif(not SHARED_PGN.exists(), reason="shared chess games not present")
def test_compare_with_interp_chess_columns(tmp_path):
    from moex.compare.command import main

    recipe = tiny_recipe(tmp_path, block_size=256, steps=2, batch_size=2, eval_batches=1)
    out = tmp_path / "cmp"
    assert main([str(recipe), "--routers", "dense-relu,topk2", "--out", str(out), "--interp", "chess",
                 "--interp-games", "8", "--pgn", str(SHARED_PGN)]) == 0
    rows = {r["variant"]: r for r in json.loads((out / "compare.json").read_text())["rows"]}
    for name, r in rows.items():
        rep = json.loads((out / "runs" / name / "interp-chess/report.json").read_text())
        assert r["coverage"] == max(s["coverage"]["score"] for s in rep["sources"].values())
        assert r["probe acc"] == max(p["accuracy"] for p in rep["probe"].values())
        assert 0 <= r["k-sparse F1 k=16"] <= 1 and 0 <= r["probe majority"] <= 1
    md = (out / "compare.md").read_text()
    assert "probe acc" in md and "k-sparse F1 k=1" in md


def test_interp_chess_refuses_a_short_context_before_training(tmp_path, capsys):
    from moex.cli import main

    rc = main(["compare", str(ROOT / "recipes/compare-tiny.yaml"), "--interp", "chess", "--out", str(tmp_path / "c")])
    assert rc == 2 and "model.block_size=128" in capsys.readouterr().err and not (tmp_path / "c").exists()
