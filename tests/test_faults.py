"""Fault injection: a run never loses its newest work (docs/reliability.md holds the fault table).

Each test damages a run the way a user or a machine would (kill -9, a corrupt or
missing checkpoint, `--fresh` over an old run, a torn metrics line, a full disk) and
checks what moex does against an uninterrupted run of the same config.
"""

import json
import os
import random
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from moex import cli
from moex import config as C
from moex import checkpoint
from moex.errors import CheckpointError, ConfigError
from moex.training.schedule import lr_at
from moex.training.trainer import Trainer, truncate_metrics

ROOT = Path(__file__).resolve().parents[1]
TINY = [
    "model.n_layer=1", "model.d_model=32", "model.n_head=2", "model.block_size=32",
    "model.moe.num_experts=4", "model.moe.top_k=2", "model.moe.d_expert=16",
    "data.source=chess_random", "data.num_games=40", "train.batch_size=4",
    "train.log_interval=2", "train.eval_interval=100", "train.eval_batches=1", "train.progress=false",
    "optim.warmup_steps=2", "optim.lr=3e-3", "train.run_name=t",
]


def _restoring_env():
    saved = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(saved)


# The trainer exports RANK/MASTER_PORT/... into os.environ; later subprocess tests must not
# inherit them (the module's reference run counts too, hence the module-scoped copy).
restore_module_env = pytest.fixture(scope="module", autouse=True)(_restoring_env)
restore_env = pytest.fixture(autouse=True)(_restoring_env)


def cfg_for(root: Path, *extra: str) -> C.Config:
    return C.load(None, TINY + [f"train.out_dir={root}/runs", f"data.cache_dir={root.parent}/cache", *extra])


def train(root: Path, *extra: str, log=None) -> Trainer:
    t = Trainer(cfg_for(root, *extra), log=log or (lambda s: None))
    t.train()
    return t


def losses(run: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())}


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An uninterrupted 6-step run (checkpoints at 2, 4, 6) and its losses."""
    root = tmp_path_factory.mktemp("ref")
    train(root, "train.max_steps=6", "train.ckpt_interval=2", "train.keep_checkpoints=3")
    return root / "runs" / "t", losses(root / "runs" / "t")


def copy_run(reference, tmp_path) -> Path:
    run = tmp_path / "runs" / "t"
    shutil.copytree(reference[0], run)
    return run


# ------------------------------------------------------------------ damaged newest checkpoint -> fallback
def _truncate(p: Path):
    f = p / "mp_rank_00_model_states.pt"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])


def _garbage(p: Path):  # same size, so only loading can tell
    f = p / "mp_rank_00_model_states.pt"
    f.write_bytes(bytes(random.Random(0).randrange(256) for _ in range(f.stat().st_size)))


DAMAGE = {
    "truncated": _truncate,
    "garbage": _garbage,
    "missing": lambda p: shutil.rmtree(p),
    "latest-garbled": lambda p: (p.parent / "latest").write_bytes(b"\xff\xfe nonsense"),
    "latest-deleted": lambda p: ((p.parent / "latest").unlink(), shutil.rmtree(p)),
    "meta-deleted-old-format": lambda p: [(q / "meta.json").unlink() for q in p.parent.glob("step-*")],
}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_damaged_newest_checkpoint_falls_back_and_resume_matches(reference, tmp_path, damage):
    run = copy_run(reference, tmp_path)
    newest = run / "checkpoints" / "step-0000006"
    DAMAGE[damage](newest)
    said = []
    if damage not in ("garbage", "latest-garbled", "meta-deleted-old-format"):
        assert checkpoint.latest(run / "checkpoints", warn=said.append).name == "step-0000004"
        assert "using the newest complete checkpoint" in said[-1]
    # resuming with a longer budget: restarts from the newest checkpoint that loads, never from 0
    log = []
    train(tmp_path, "train.max_steps=6", "train.ckpt_interval=2", "train.keep_checkpoints=3", log=log.append)
    text = "\n".join(log)
    want = 6 if damage in ("latest-garbled", "meta-deleted-old-format") else 4
    assert f"(step {want})" in text, text
    assert losses(run) == reference[1]  # steps 5-6 retrained bit for bit, earlier records kept


def test_eval_load_falls_back_and_names_a_corrupt_file(reference, tmp_path):
    from moex.checkpoint.load import load_model

    run = copy_run(reference, tmp_path)
    _truncate(run / "checkpoints" / "step-0000006")
    said = []
    assert load_model(run, warn=said.append).step == 4 and "step-0000006" in said[0]
    _garbage(run / "checkpoints" / "step-0000004")
    with pytest.raises(CheckpointError, match=r"step-0000004/mp_rank_00_model_states.pt: corrupt or truncated"):
        load_model(run / "checkpoints" / "step-0000004")


def test_old_checkpoints_without_side_file_still_load(reference, tmp_path):
    from moex.checkpoint.load import load_model

    run = copy_run(reference, tmp_path)
    for meta in run.glob("checkpoints/step-*/meta.json"):
        meta.unlink()
    assert checkpoint.read_meta(run / "checkpoints" / "step-0000006")["step"] == 6
    assert [p.name for p in checkpoint.list_checkpoints(run / "checkpoints")][-1] == "step-0000006"
    assert load_model(run).step == 6


# ------------------------------------------------------------------ housekeeping
def test_fresh_moves_the_old_run_aside_and_keeps_its_own_checkpoints(reference, tmp_path):
    run = copy_run(reference, tmp_path)
    log = []
    train(tmp_path, "train.max_steps=3", "train.ckpt_interval=1", "train.keep_checkpoints=2", "train.resume=never",
          log=log.append)
    old = [p for p in run.parent.iterdir() if p.name.startswith("t.old-")]
    assert len(old) == 1 and f"moved the previous run to {old[0]}" in "\n".join(log)
    assert losses(old[0]) == reference[1]  # the old history, whole
    assert sorted(losses(run)) == [1, 2, 3]  # the new history only
    ckpts = run / "checkpoints"
    assert [p.name for p in checkpoint.list_checkpoints(ckpts)] == ["step-0000002", "step-0000003"]
    assert checkpoint.latest_tag(ckpts) == "step-0000003"


def test_resume_and_fresh_together_are_refused(capsys):
    assert cli.main(["train", str(ROOT / "recipes/chess-tiny.yaml"), "--resume", "--fresh"]) == 2
    assert "moex: error: --resume and --fresh contradict each other" in capsys.readouterr().err


def test_prune_orders_by_step_and_never_deletes_what_latest_names(tmp_path):
    ckpts = tmp_path / "checkpoints"
    for step in (2, 4, 6, 10):
        d = ckpts / checkpoint.tag_for(step)
        d.mkdir(parents=True)
        (d / "mp_rank_00_model_states.pt").write_bytes(b"x")
        checkpoint.format.write_meta(d, {"step": step, "config": {}})
    (ckpts / "tmp-step-0000012").mkdir()
    (ckpts / "latest").write_text("step-0000004")
    checkpoint.prune(ckpts, keep=2)
    assert sorted(p.name for p in ckpts.iterdir()) == ["latest", "step-0000004", "step-0000006", "step-0000010"]


def test_torn_metrics_line_is_repaired_with_a_warning(tmp_path):
    f = tmp_path / "metrics.jsonl"
    f.write_text("".join(json.dumps({"step": s, "loss": 1.0}) + "\n" for s in range(1, 7)) + '{"step": 7, "lo')
    said = []
    truncate_metrics(f, 4, warn=said.append)
    assert [json.loads(l)["step"] for l in f.read_text().splitlines()] == [1, 2, 3, 4]
    assert said and str(f) in said[0] and "torn last line" in said[0]
    f.write_text('{"step": 1}\nnot json\n{"step": 2}\n')
    with pytest.raises(CheckpointError, match=rf"{f}:2: not a JSON record"):
        truncate_metrics(f, 2)


# ------------------------------------------------------------------ resume semantics
def test_changed_schedule_takes_effect_on_resume_with_a_note(reference, tmp_path):
    run = copy_run(reference, tmp_path)
    for d in ("step-0000006",):
        shutil.rmtree(run / "checkpoints" / d)
    (run / "checkpoints" / "latest").write_text("step-0000004")
    log = []
    t = train(tmp_path, "train.max_steps=8", "train.ckpt_interval=2", "optim.lr=1e-3", "optim.min_lr=1e-5",
              log=log.append)
    text = "\n".join(log)
    assert "optim.lr 0.003 -> 0.001" in text and "train.max_steps 6 -> 8" in text and "optim.min_lr" in text
    recs = {r["step"]: r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())}
    for step in (5, 6, 7, 8):  # the lr logged after optimizer step s is the schedule's value for step s
        assert recs[step]["lr"] == pytest.approx(lr_at(step, t.cfg.optim, 8), rel=1e-9)


def test_model_shape_change_is_refused_before_anything_is_written(reference, tmp_path):
    run = copy_run(reference, tmp_path)
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    with pytest.raises(ConfigError, match=r"model.moe.num_experts=4 .* this config has 2"):
        Trainer(cfg_for(tmp_path, "train.max_steps=8", "model.moe.num_experts=2"), log=lambda s: None)
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == before


# ------------------------------------------------------------------ signals
def test_first_ctrl_c_checkpoints_and_second_aborts(tmp_path):
    # A shell starts background jobs with SIGINT ignored: give the test Python's default handler
    # so the trainer's own handler is what is exercised, and restore whatever was there.
    outer = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        _ctrl_c_twice(tmp_path)
    finally:
        signal.signal(signal.SIGINT, outer)


def _ctrl_c_twice(tmp_path):
    t = Trainer(cfg_for(tmp_path, "train.max_steps=20", "train.ckpt_interval=100"), log=lambda s: None)
    real = t._step

    def interrupted(step, acc):
        if step == 2:
            os.kill(os.getpid(), signal.SIGINT)
        return real(step, acc)

    t._step = interrupted
    with pytest.raises(SystemExit) as e:
        t.train()
    assert e.value.code == 130
    assert checkpoint.latest_tag(tmp_path / "runs" / "t" / "checkpoints") == "step-0000003"

    t2 = Trainer(cfg_for(tmp_path, "train.max_steps=20", "train.ckpt_interval=100"), log=lambda s: None)
    real2 = t2._step

    def twice(step, acc):
        if step == 4:
            os.kill(os.getpid(), signal.SIGINT)
            os.kill(os.getpid(), signal.SIGINT)
        return real2(step, acc)

    t2._step = twice
    with pytest.raises(KeyboardInterrupt):
        t2.train()
    assert checkpoint.latest_tag(tmp_path / "runs" / "t" / "checkpoints") == "step-0000003"
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # handlers restored


# ------------------------------------------------------------------ full / read-only disk
def _mount_tmpfs(where: Path, size: str) -> bool:
    if os.geteuid() != 0 or shutil.which("mount") is None:
        return False
    where.mkdir(parents=True, exist_ok=True)
    return subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)],
                          capture_output=True).returncode == 0


@pytest.mark.parametrize("mode", ["full", "read-only"])
def test_full_or_read_only_disk_is_named_in_one_line(tmp_path, capsys, mode):
    disk = tmp_path / "disk"
    if not _mount_tmpfs(disk, "64k" if mode == "full" else "4m"):
        pytest.skip("needs root and a mountable tmpfs to fake a full / read-only disk")
    try:
        if mode == "read-only":
            subprocess.run(["mount", "-o", "remount,ro", str(disk)], check=True)
        rc = cli.main(["train", str(ROOT / "recipes/chess-tiny.yaml"), *TINY, "train.max_steps=2",
                       f"train.out_dir={disk}/runs", f"data.cache_dir={tmp_path}/cache"])
        errors = [l for l in capsys.readouterr().err.splitlines() if l.startswith("moex: error: ")]
        assert rc == 2 and len(errors) == 1, errors
        assert ("no space left on device" if mode == "full" else "read-only file system") in errors[0]
        assert str(disk) in errors[0]
        assert not list(disk.rglob("tmp-step-*"))
    finally:
        subprocess.run(["umount", "-l", str(disk)], capture_output=True)


# ------------------------------------------------------------------ kill -9 (real processes)
DRIVER = r"""
import os, signal, sys
kind, n, argv = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
if kind == "step":  # SIGKILL ourselves as optimizer step n begins
    from moex.training import trainer
    real = trainer.Trainer._step
    def _step(self, step, acc):
        if step == n:
            os.kill(os.getpid(), signal.SIGKILL)
        return real(self, step, acc)
    trainer.Trainer._step = _step
else:  # SIGKILL ourselves in the middle of the n-th checkpoint file write
    import torch
    real_save, calls = torch.save, [0]
    def save(obj, f, *a, **k):
        calls[0] += 1
        if calls[0] == n:
            if isinstance(f, (str, os.PathLike)):
                with open(f, "wb") as h:
                    h.write(b"half a file")
            os.kill(os.getpid(), signal.SIGKILL)
        return real_save(obj, f, *a, **k)
    torch.save = save
from moex import cli
sys.exit(cli.main(["train", *argv]))
"""
_LAUNCH_VARS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def _run_train(tmp_path, kind=None, n=0):
    recipe = tmp_path / "t.yaml"
    recipe.write_text("train:\n  seed: 1337\n")
    argv = [str(recipe), *TINY, "train.max_steps=6", "train.ckpt_interval=2", "train.keep_checkpoints=3",
            f"train.out_dir={tmp_path}/runs", f"data.cache_dir={tmp_path}/cache"]
    env = {k: v for k, v in os.environ.items() if k not in _LAUNCH_VARS}
    env["PYTHONPATH"] = str(ROOT)
    cmd = [sys.executable, "-c", DRIVER, kind, str(n), *argv] if kind else [sys.executable, "-m", "moex.cli", "train", *argv]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)


@pytest.mark.slow
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_kill9_at_random_steps_and_during_checkpoint_writes(reference, tmp_path, seed):
    rng = random.Random(seed)
    at_step = rng.randrange(1, 6)
    p = _run_train(tmp_path, "step", at_step)
    assert p.returncode == -signal.SIGKILL, p.stderr[-2000:]
    # 3 files per checkpoint (model states, optimizer states, portable Adam state): any one of the next ones
    p = _run_train(tmp_path, "write", rng.randrange(1, 7))
    assert p.returncode in (-signal.SIGKILL, 0), p.stderr[-2000:]
    p = _run_train(tmp_path)
    assert p.returncode == 0, p.stderr[-2000:]
    run = tmp_path / "runs" / "t"
    assert losses(run) == reference[1]
    assert not list((run / "checkpoints").glob("tmp-*"))
    assert checkpoint.latest_tag(run / "checkpoints") == "step-0000006"


# ------------------------------------------------------------------ commands that refuse up front
def test_interpret_suite_mismatch_is_refused_up_front(reference, tmp_path, capsys):
    out = tmp_path / "interp"
    assert cli.main(["interpret", str(reference[0]), "--suite", "text", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "--suite text does not fit" in err and "data.tokenizer=chess (use --suite chess)" in err
    assert not out.exists()


def test_upcycle_with_other_data_is_refused_up_front(reference, tmp_path, capsys):
    out = tmp_path / "up"
    rc = cli.main(["upcycle", str(reference[0]), str(ROOT / "recipes/shakespeare-char-moex.yaml"), "--out", str(out)])
    err = capsys.readouterr().err
    assert rc == 2 and "does not read the data" in err and "data.tokenizer: dense 'chess', recipe 'char'" in err
    assert not out.exists()


def test_output_dir_is_removed_on_failure_only_when_created(tmp_path):
    from moex.output import output_dir

    with pytest.raises(RuntimeError):
        with output_dir(tmp_path / "new") as d:
            (d / "partial").write_text("x")
            raise RuntimeError("boom")
    assert not (tmp_path / "new").exists()
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "keep").write_text("x")
    with pytest.raises(RuntimeError):
        with output_dir(tmp_path / "old"):
            raise RuntimeError("boom")
    assert (tmp_path / "old" / "keep").exists()
