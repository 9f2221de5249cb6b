"""End-to-end training on CPU through DeepSpeed: learning, exact resume, atomic checkpoints."""

import json
from pathlib import Path

import pytest
import torch

from moex import config as C
from moex import checkpoint
from moex.training.trainer import Trainer, TrainingError

TINY = [
    "model.n_layer=2", "model.d_model=32", "model.n_head=2", "model.block_size=32",
    "model.moe.num_experts=4", "model.moe.top_k=2", "model.moe.d_expert=16",
    "data.source=chess_random", "data.num_games=60", "train.batch_size=4",
    "train.log_interval=2", "train.eval_interval=4", "train.eval_batches=2", "train.progress=false",
    "optim.warmup_steps=2", "optim.lr=3e-3",
]


def cfg_for(tmp_path: Path, *extra: str) -> C.Config:
    return C.load(None, TINY + [f"train.out_dir={tmp_path}/runs", "train.run_name=t",
                                f"data.cache_dir={tmp_path}/cache", *extra])


def losses(run_dir: Path) -> dict[int, float]:
    recs = [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in recs}


def test_tiny_run_learns_and_writes_run_dir(tmp_path):
    t = Trainer(cfg_for(tmp_path, "train.max_steps=24", "train.ckpt_interval=12"), log=lambda s: None)
    last = t.train()
    run = tmp_path / "runs" / "t"
    ls = losses(run)
    assert sum(list(ls.values())[-4:]) / 4 < sum(list(ls.values())[:4]) / 4 - 0.3
    assert (run / "config.yaml").exists() and list((run / "tb").iterdir())
    assert checkpoint.latest_tag(run / "checkpoints") == "step-0000024"
    assert "val" in last and last["val"]["layers"][0]["cv"] >= 0
    cfg = C.from_dict(checkpoint.load_client_state(run / "checkpoints" / "step-0000024")["config"])
    assert cfg.model.vocab_size == 32  # resolved config (vocab from tokenizer) saved in the checkpoint


def test_resume_gives_identical_losses(tmp_path):
    full = Trainer(cfg_for(tmp_path / "a", "train.max_steps=10", "train.ckpt_interval=5"), log=lambda s: None)
    full.train()
    ref = losses(tmp_path / "a" / "runs" / "t")
    # the same run killed during step 8 (after the step-5 checkpoint), then resumed
    part = Trainer(cfg_for(tmp_path / "b", "train.max_steps=10", "train.ckpt_interval=5"), log=lambda s: None)
    real_step = part._step

    def killed_at_8(step, acc):
        if step == 7:
            raise KeyboardInterrupt("killed")
        return real_step(step, acc)

    part._step = killed_at_8
    with pytest.raises(KeyboardInterrupt):
        part.train()
    resumed = Trainer(cfg_for(tmp_path / "b", "train.max_steps=10", "train.ckpt_interval=5"), log=lambda s: None)
    resumed.train()
    got = losses(tmp_path / "b" / "runs" / "t")
    assert sorted(got) == list(range(1, 11))
    for s in range(6, 11):
        assert got[s] == ref[s], (s, got[s], ref[s])


def test_interrupted_checkpoint_write_keeps_previous(tmp_path, monkeypatch):
    t = Trainer(cfg_for(tmp_path, "train.max_steps=4", "train.ckpt_interval=2"), log=lambda s: None)
    t.train()
    ckpts = tmp_path / "runs" / "t" / "checkpoints"
    assert checkpoint.latest_tag(ckpts) == "step-0000004"
    real_save = torch.save

    def dying_save(obj, f, *a, **k):  # the writer dies half-way through a file
        with open(f, "wb") as fh:
            fh.write(b"PK\x03\x04 truncated")
        raise KeyboardInterrupt("killed mid-write")

    monkeypatch.setattr(torch, "save", dying_save)
    with pytest.raises(KeyboardInterrupt):
        t.save(6)
    monkeypatch.setattr(torch, "save", real_save)
    assert checkpoint.latest_tag(ckpts) == "step-0000004"
    from moex.checkpoint.load import load_model

    loaded = load_model(tmp_path / "runs" / "t")
    assert loaded.step == 4


def test_nonfinite_loss_stops_with_clear_error(tmp_path):
    t = Trainer(cfg_for(tmp_path, "train.max_steps=6", "train.ckpt_interval=2"), log=lambda s: None)
    t.cfg.train.max_steps = 2
    t.train()
    t.cfg.train.max_steps = 6
    t.cfg.train.resume = "never"  # keep the poisoned in-memory weights
    with torch.no_grad():
        t.model.wte.weight[0, 0] = float("nan")
    with pytest.raises(TrainingError, match=r"non-finite loss \(nan\) at step 1"):
        t.train()
    assert checkpoint.latest_tag(tmp_path / "runs" / "t" / "checkpoints") == "step-0000002"


def test_init_from_loads_weights_for_a_fresh_run(tmp_path):
    a = Trainer(cfg_for(tmp_path / "a", "train.max_steps=2", "train.ckpt_interval=2"), log=lambda s: None)
    a.train()
    b = Trainer(cfg_for(tmp_path / "b", "train.max_steps=2", f"train.init_from={tmp_path}/a/runs/t"), log=lambda s: None)
    for (n, pa), pb in zip(a.model.named_parameters(), b.model.parameters()):
        torch.testing.assert_close(pa, pb, msg=n)
    with pytest.raises(FileNotFoundError, match="init_from"):
        Trainer(cfg_for(tmp_path / "c", f"train.init_from={tmp_path}/nope.pt"), log=lambda s: None)


def test_bf16_run_tracks_fp32(tmp_path):
    runs = {}
    for prec in ("fp32", "bf16"):
        Trainer(cfg_for(tmp_path / prec, "train.max_steps=3", f"train.precision={prec}"), log=lambda s: None).train()
        runs[prec] = losses(tmp_path / prec / "runs" / "t")
    for s in range(1, 4):
        assert abs(runs["bf16"][s] - runs["fp32"][s]) < 0.05 * runs["fp32"][s]
