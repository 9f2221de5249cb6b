"""`moex generate` and `moex eval --data/--suite` end to end on a tiny trained run, in subprocesses."""

import pytest

from test_cli import ROOT, moex

OVER = ["model.n_layer=1", "model.d_model=32", "model.n_head=2", "model.block_size=32", "model.moe.d_expert=16",
        "data.num_games=40", "train.max_steps=4", "train.batch_size=4", "train.eval_interval=4",
        "train.eval_batches=1", "train.ckpt_interval=4", "train.progress=false", "train.log_interval=2"]


@pytest.fixture(scope="module")
def chess_run(tmp_path_factory):
    cwd = tmp_path_factory.mktemp("chess-run")
    moex("train", str(ROOT / "recipes/chess-tiny.yaml"), *OVER, cwd=cwd)
    return cwd


@pytest.mark.slow
def test_generate_continues_the_prompt_and_errors_are_clear(chess_run):
    args = ["generate", "runs/chess-tiny", "--prompt", ";1.e4 e5 2.", "--max-new-tokens", "40", "--top-k", "8"]
    a = moex(*args, "--seed", "3", cwd=chess_run).stdout
    assert a.startswith(";1.e4 e5 2.") and len(a.strip()) == len(";1.e4 e5 2.") + 40  # one char per token
    bad = moex("generate", "runs/chess-tiny", "--prompt", "hello!", cwd=chess_run, check=False)
    assert bad.returncode == 2 and bad.stderr.startswith("moex: error: chess tokenizer: character 'l'")
    assert "Traceback" not in bad.stderr


@pytest.mark.slow
def test_eval_on_any_text_and_chess_legal(chess_run):
    (chess_run / "games.txt").write_text(";1.e4 e5 2.Nf3 Nc6 3.Bb5 a6\n;1.d4 d5 2.c4 e6 3.Nc3 Nf6\n" * 4)
    e = moex("eval", "runs/chess-tiny", "--data", "games.txt", "--stride", "8", "--words", "eol", cwd=chess_run)
    assert "stride 8" in e.stdout and "word ppl" in e.stdout and "eol rule" in e.stdout
    assert (chess_run / "runs/chess-tiny/eval-games_txt.json").is_file()
    bad = moex("eval", "runs/chess-tiny", "--data", "games.txt", "--stride", "99", cwd=chess_run, check=False)
    assert bad.returncode == 2 and bad.stderr.startswith("moex: error: stride 99")
    pgn = "".join(f'[Event "{i}"]\n[Result "*"]\n\n1. e4 e5 2. Nf3 Nc6 3. Bb5 a6 4. Ba4 Nf6 5. O-O Be7 *\n\n'
                  for i in range(2))
    (chess_run / "games.pgn").write_text(pgn)  # the test must not depend on where the shared data lies
    c = moex("eval", "runs/chess-tiny", "--suite", "chess-legal", "--games", "2", "--pgn", "games.pgn", cwd=chess_run)
    assert "legal-move rate" in c.stdout and "reach 40" in c.stdout
