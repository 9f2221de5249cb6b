"""`moex interpret` end to end on tiny trained models (chess and text suites)."""

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import chess
import chess.pgn
import pytest

ROOT = Path(__file__).resolve().parents[1]
UD = ROOT.parent / "shared/data/ud-english-ewt/en_ewt-ud-dev.conllu"
TINY = ["model.n_layer=2", "model.d_model=32", "model.n_head=2", "model.block_size=256", "model.moe.d_expert=16",
        "model.moe.num_experts=4", "train.max_steps=3", "train.batch_size=2", "train.eval_interval=3",
        "train.eval_batches=1", "train.ckpt_interval=3", "train.progress=false"]


def moex(*args, cwd):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    p = subprocess.run([sys.executable, "-m", "moex.cli", *args], cwd=cwd, env=env, capture_output=True, text=True)
    assert p.returncode == 0, f"{p.stdout}\n{p.stderr}"
    return p


def write_pgn(path: Path, n: int = 12) -> None:
    rng = random.Random(0)
    with open(path, "w") as f:
        for _ in range(n):
            b, game = chess.Board(), chess.pgn.Game()
            node = game
            for _ in range(40):
                moves = list(b.legal_moves)
                if not moves:
                    break
                m = rng.choice(moves)
                node = node.add_variation(m)
                b.push(m)
            print(game, file=f, end="\n\n")


@pytest.mark.slow
def test_chess_suite_report(tmp_path):
    moex("train", str(ROOT / "recipes/chess-tiny.yaml"), *TINY, "data.num_games=30", cwd=tmp_path)
    write_pgn(tmp_path / "eval.pgn")
    moex("interpret", "runs/chess-tiny", "--suite", "chess", "--pgn", str(tmp_path / "eval.pgn"), "--games", "12",
         "--out", "rep", cwd=tmp_path)
    rep = json.loads((tmp_path / "rep/report.json").read_text())
    assert rep["games"] == 12 and rep["label_games"] == 6
    assert set(rep["sources"]) == {f"L{i}.moe.{s}" for i in (0, 1) for s in ("code", "code_raw", "gates")}
    for r in rep["sources"].values():
        assert 0 <= r["coverage"]["score"] <= 1 and r["coverage"]["properties"] == 768
        rec = r["reconstruction"]
        assert all(0 <= rec[k] <= 1 for k in ("score", "per_square_f1", "max_active", "max_active_per_square"))
        assert rec["threshold"] <= 0.9
        assert set(rec["per_threshold"]) == {"0.0", "0.1", "0.2", "0.3", "0.4", "0.5", "0.6", "0.7", "0.8", "0.9",
                                             "max_active"}
    assert set(rep["probe"]) == {"L0.resid", "L1.resid"} and set(rep["ksparse"]) == set(rep["sources"])
    for r in rep["probe"].values():
        assert 0 <= r["accuracy"] <= 1 and 0 <= r["majority_baseline"] <= 1 and r["dim"] == 32
    assert rep["ksparse"]["L1.moe.code"]["piece_masked"]["properties"] == 768
    assert (tmp_path / "rep/acts/L0.moe.code.npz").exists()  # sparse sources are stored sparse
    md = (tmp_path / "rep/report.md").read_text()
    assert md.count("| L0.resid |") == 1 and "k-sparse probing" in md and (tmp_path / "rep/chess_scores.png").exists()
    moex("interpret", "runs/chess-tiny", "--suite", "chess", "--pgn", str(tmp_path / "eval.pgn"), "--games", "12",
         "--no-probes", "--out", "rep2", cwd=tmp_path)
    rep2 = json.loads((tmp_path / "rep2/report.json").read_text())
    assert "probe" not in rep2 and "ksparse" not in rep2 and rep2["sources"].keys() == rep["sources"].keys()


@pytest.mark.slow
def test_chess_suite_monet_with_dense_layers(tmp_path):
    moex("train", str(ROOT / "recipes/chess-tiny.yaml"), *TINY, "data.num_games=30", "model.ffn=monet",
         "model.moe_every=2", "model.monet.num_sub_experts=8", "model.monet.num_heads=2", cwd=tmp_path)
    write_pgn(tmp_path / "eval.pgn")
    moex("interpret", "runs/chess-tiny", "--suite", "chess", "--pgn", str(tmp_path / "eval.pgn"), "--games", "8",
         "--no-probes", "--out", "rep", cwd=tmp_path)
    rep = json.loads((tmp_path / "rep/report.json").read_text())
    assert set(rep["sources"]) == {"L0.mlp.pre", "L0.mlp.post", "L1.monet.experts", "L1.monet.sub1",
                                   "L1.monet.sub2", "L1.monet.code"}
    assert rep["sources"]["L1.monet.experts"]["features"] == 64


@pytest.mark.slow
@pytest.mark.skipif(not UD.exists(), reason="shared UD data not present")
def test_text_suite_report(tmp_path):
    import string

    (tmp_path / "t.txt").write_text((string.ascii_letters + string.digits + string.punctuation + " \n") * 300)
    moex("train", str(ROOT / "recipes/shakespeare-char-moex.yaml"), *TINY, f"data.path={tmp_path}/t.txt",
         cwd=tmp_path)
    moex("interpret", "runs/shakespeare-char-moex", "--suite", "text", "--conllu", str(UD), "--sentences", "20",
         "--out", "rep", cwd=tmp_path)
    rep = json.loads((tmp_path / "rep/report.json").read_text())
    assert rep["sentences"] + rep["skipped_sentences"] == 20 and rep["sentences"] >= 15 and rep["tokens"] > 100
    assert 0 <= rep["sources"]["L1.moe.code"]["mean_best_f1"] <= 1
    mi = rep["routing"]["L1.moe.gates"]["mutual_information"]
    assert 0 <= mi["mi_bits"] <= mi["tag_entropy_bits"] + 1e-9
    assert (tmp_path / "rep/routing_L1.moe.gates.png").exists() and (tmp_path / "rep/features.md").exists()
    ks = rep["ksparse"]["L1.moe.code"]
    assert ks["properties"] == 17 and all(v is None or 0 <= v <= 1 for v in ks["f1"].values())


@pytest.mark.slow
@pytest.mark.skipif(not (ROOT.parent / "shared/data/chess/games.pgn").exists(), reason="shared chess games not present")
def test_interp_over_training_and_all_checkpoints(tmp_path):
    # chess_random training data; the live scoring reads real games from the data root
    moex("train", str(ROOT / "recipes/chess-tiny.yaml"), *TINY, "data.num_games=30", "train.max_steps=4",
         f"data.root={ROOT.parent / 'shared/data'}",
         "train.ckpt_interval=2", "train.keep_checkpoints=5", "train.interp_interval=2", "train.interp_games=8",
         cwd=tmp_path)
    run = tmp_path / "runs/chess-tiny"
    live = json.loads((run / "interp/curve.json").read_text())
    assert [p["step"] for p in live] == [2, 4] and (run / "interp/curve.png").exists()
    tokens_per_step = 2 * 256  # batch_size x block_size, one rank
    assert [p["tokens"] for p in live] == [2 * tokens_per_step, 4 * tokens_per_step]
    assert all(0 <= p["probe_accuracy"] <= 1 and 0 <= p["coverage"] <= 1 for p in live)
    recs = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in recs if "interp" in r] == [2, 4]

    write_pgn(tmp_path / "eval.pgn")
    moex("interpret", "runs/chess-tiny", "--suite", "chess", "--all-checkpoints", "--pgn", str(tmp_path / "eval.pgn"),
         "--games", "8", "--out", "curve", cwd=tmp_path)
    pts = json.loads((tmp_path / "curve/curve.json").read_text())
    assert [p["step"] for p in pts] == [2, 4] and (tmp_path / "curve/curve.png").exists()
    for p in pts:
        rep = json.loads((tmp_path / f"curve/step-{p['step']:07d}/report.json").read_text())
        assert p["coverage"] == max(r["coverage"]["score"] for r in rep["sources"].values())
        assert p["probe_accuracy"] == max(r["accuracy"] for r in rep["probe"].values())
