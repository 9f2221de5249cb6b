"""One-line errors: every bad input ends in `moex: error: …` naming the key or file, exit 2, no traceback."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from moex import cli
from moex import config as C
from moex.errors import CheckpointError, ConfigError, DataError, MoexError, StorageError, TrainingError

ROOT = Path(__file__).resolve().parents[1]
CHESS = str(ROOT / "recipes/chess-tiny.yaml")

# (override, what the message must name) — the validation gaps that used to crash later or train silently
PROBES = [
    ("model.n_head=0", "model.n_head=0 must be > 0"),
    ("model.n_head=3", "model.d_model=128 must be divisible by model.n_head=3"),
    ("optim.lr=0", "optim.lr=0.0 must be > 0"),
    ("optim.lr=-1e-3", "optim.lr=-0.001 must be > 0"),
    ("optim.min_lr=1", "optim.min_lr=1.0 must be <= optim.lr"),
    ("optim.beta2=1", "optim.beta2=1.0 must be in [0, 1)"),
    ("optim.warmup_steps=-1", "optim.warmup_steps=-1 must be >= 0"),
    ("train.ckpt_interval=0", "train.ckpt_interval=0 must be > 0"),
    ("train.eval_interval=0", "train.eval_interval=0 must be > 0"),
    ("train.log_interval=0", "train.log_interval=0 must be > 0"),
    ("train.batch_size=0", "train.batch_size=0 must be > 0"),
    ("train.grad_accum=0", "train.grad_accum=0 must be > 0"),
    ("train.max_steps=0", "train.max_steps=0 must be > 0"),
    ("train.keep_checkpoints=-1", "train.keep_checkpoints=-1 must be >= 0"),
    ("train.run_name=a/b", "train.run_name='a/b' must be a plain directory name"),
    ("model.block_size=0", "model.block_size=0 must be > 0"),
    ("model.dropout=1.5", "model.dropout=1.5 must be in [0, 1)"),
    ("model.moe.capacity_factor=0", "model.moe.capacity_factor=0.0 must be > 0"),
    ("model.moe.router=nope", "model.moe.router='nope' is not a router; valid: aux_free, expert_choice"),
    ("model.moe.top_k=9", "model.moe.top_k=9 must be in [1, num_experts=8]"),
    ("model.moe.num_experts=0", "model.moe.num_experts=0 must be > 0"),
    ("data.val_fraction=1", "data.val_fraction=1.0 must be in (0, 1)"),
    ("data.num_games=1", "data.num_games=1 must be >= 2"),
    ("parallel.ep_size=0", "parallel.ep_size=0 must be > 0"),
    ("parallel.ep_size=3", "model.moe.num_experts=8 must be divisible by parallel.ep_size=3"),
    ("model.moe.num_sub_experts=4", "'model.moe.num_sub_experts' moved to 'model.monet.num_sub_experts or "
                                    "model.peer.num_sub_experts'"),
    ("model.moe.monet_mode=vd", "'model.moe.monet_mode' moved to 'model.monet.mode'"),
    ("model.monet.top_k=16", "model.monet.top_k=16 must be < model.monet.num_sub_experts=16"),
    ("model.peer.top_k=17", "model.peer.top_k=17 must be <= model.peer.num_sub_experts=16"),
]


@pytest.mark.parametrize("override,message", PROBES, ids=[p for p, _ in PROBES])
def test_validation_probe_is_one_line_error_naming_the_key(override, message, capsys, tmp_path):
    rc = cli.main(["train", CHESS, override, f"train.out_dir={tmp_path}"])
    err = capsys.readouterr().err
    assert rc == 2
    assert err.startswith("moex: error: ") and err.count("\n") == 1, err
    assert message in err
    assert not any(tmp_path.iterdir())  # nothing written


def test_every_shipped_recipe_still_validates():
    for r in sorted((ROOT / "recipes").rglob("*.yaml")):
        C.load(r)


def test_recipe_file_errors_name_the_file(tmp_path, capsys):
    empty, bad, missing = tmp_path / "empty.yaml", tmp_path / "bad.yaml", tmp_path / "nope.yaml"
    empty.write_text("")
    bad.write_text("model:\n  n_layer: [2\n")
    for path, want in ((empty, f"recipe {empty} is empty"), (bad, f"{bad}:3:1: malformed YAML"),
                       (missing, f"recipe not found: {missing}")):
        assert cli.main(["info", str(path)]) == 2
        assert want in capsys.readouterr().err


def test_usage_errors(capsys):
    assert cli.main(["train", CHESS, "--resume", "--fresh"]) == 2
    assert "--resume and --fresh contradict each other" in capsys.readouterr().err
    assert cli.main(["compare", CHESS, "--routers", ""]) == 2
    assert "--routers names no variant" in capsys.readouterr().err
    assert cli.main(["compare", CHESS, "--routers", "moex,bogus"]) == 2
    assert "unknown variants ['bogus']" in capsys.readouterr().err


def test_error_classes_share_one_base_and_keep_their_builtin_kinds():
    for cls in (ConfigError, DataError, CheckpointError, TrainingError, StorageError):
        assert issubclass(cls, MoexError)
    assert issubclass(ConfigError, ValueError) and issubclass(DataError, ValueError)
    from moex.data import DataError as D2
    from moex.training.trainer import TrainingError as T2

    assert D2 is DataError and T2 is TrainingError and C.ConfigError is ConfigError


@pytest.fixture
def restore_env():
    """The trainer exports RANK/MASTER_PORT/... into os.environ; later subprocess tests must not inherit them."""
    saved = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(saved)


@pytest.mark.parametrize("content,cause", [(b"", "empty text file"), (b"abc\0\1\2" * 100, "binary file"),
                                           (b"caf\xe9 au lait\n" * 50, "not UTF-8 text")])
def test_bad_text_files_are_named_and_no_run_dir_is_left(tmp_path, capsys, content, cause, restore_env):
    f = tmp_path / "corpus.txt"
    f.write_bytes(content)
    rc = cli.main(["train", str(ROOT / "recipes/shakespeare-char-moex.yaml"), f"data.path={f}",
                   f"train.out_dir={tmp_path}/runs", f"data.cache_dir={tmp_path}/cache"])
    assert rc == 2
    assert f"moex: error: {f}: {cause}" in capsys.readouterr().err
    assert not (tmp_path / "runs" / "shakespeare-char-moex").exists()


def test_debug_env_shows_the_traceback(tmp_path, capsys, monkeypatch):
    assert cli.main(["info", str(tmp_path / "none.yaml")]) == 2
    assert "Traceback" not in capsys.readouterr().err
    monkeypatch.setenv("MOEX_DEBUG", "1")
    with pytest.raises(ConfigError, match="recipe not found"):  # propagates: Python prints the traceback
        cli.main(["info", str(tmp_path / "none.yaml")])


@pytest.mark.slow
def test_expert_parallel_on_one_process_is_refused_before_writing(tmp_path):
    # a subprocess: initialising torch.distributed here would leak MASTER_PORT into later tests
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    p = subprocess.run([sys.executable, "-m", "moex.cli", "train", CHESS, "parallel.ep_size=2",
                        f"train.out_dir={tmp_path}"], env=env, capture_output=True, text=True, timeout=900)
    assert p.returncode == 2 and "Traceback" not in p.stderr
    assert "parallel.ep_size=2 needs a world size divisible by it; this run has 1 process" in p.stderr
    assert not any(tmp_path.iterdir())
