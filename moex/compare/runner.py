"""Train and evaluate one compare variant in a fresh `moex train` subprocess (resumable).

Layout under the compare directory OUT:
    OUT/runs/<variant>/          the run (checkpoints, metrics.jsonl, config.yaml)
    OUT/runs/<variant>/compare-eval.json   its evaluation (written last: marks it done)
    OUT/logs/<variant>.log       the training process's output
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from moex import config as C
from moex.errors import TrainingError
from moex import checkpoint

EVAL_FILE = "compare-eval.json"


def run_dir(out: Path, name: str) -> Path:
    return Path(out) / "runs" / name


def is_done(out: Path, name: str, max_steps: int) -> bool:
    """A finished variant: a final checkpoint at max_steps and its evaluation."""
    rd = run_dir(out, name)
    return checkpoint.latest_tag(rd / "checkpoints") == checkpoint.tag_for(max_steps) and (rd / EVAL_FILE).exists()


def train_variant(recipe: str, overrides: list[str], out: Path, name: str, *, log=print) -> float:
    """Run `python -m moex.cli train` for the variant (resuming any partial run); returns wall seconds."""
    out = Path(out)
    (out / "logs").mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "moex.cli", "train", recipe, *overrides,
           f"train.out_dir={out / 'runs'}", f"train.run_name={name}", "train.progress=false"]
    env = dict(os.environ)  # the child picks its accelerator itself (CPU only when there is no CUDA)
    root = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    log(f"[{name}] " + " ".join(cmd[3:]))
    t0 = time.time()
    with open(out / "logs" / f"{name}.log", "a") as f:
        rc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=env).returncode
    if rc != 0:
        logfile = out / "logs" / f"{name}.log"
        tail = [l for l in logfile.read_text().splitlines() if l.strip()][-1:] or [""]
        raise TrainingError(f"variant {name}: training exited with {rc} (log {logfile}): {tail[0].strip()}")
    return time.time() - t0


def evaluate_variant(out: Path, name: str, *, eval_batches: int) -> dict:
    """Evaluate the variant's final checkpoint on its validation split; writes compare-eval.json."""
    from moex.eval.report import evaluate_checkpoint
    from moex.models.info import describe

    rd = run_dir(out, name)
    res = evaluate_checkpoint(rd, max_batches=eval_batches, progress=False)
    cfg = C.from_saved(_cfg_dict(rd))
    res["params"] = describe(cfg)
    res["train"] = train_summary(rd / "metrics.jsonl")
    (rd / EVAL_FILE).write_text(json.dumps(res, indent=2))
    return res


def _cfg_dict(rd: Path) -> dict:
    import yaml

    return yaml.safe_load((rd / "config.yaml").read_text())


def read_metrics(path: Path) -> list[dict]:
    if not Path(path).exists():
        return []
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def train_summary(path: Path) -> dict:
    """Final train loss and mean training throughput (tokens/s over logged intervals)."""
    recs = read_metrics(path)
    tps = [r["tokens_per_s"] for r in recs if "tokens_per_s" in r]
    return {
        "steps": recs[-1]["step"] if recs else 0,
        "final_train_loss": recs[-1]["loss"] if recs else None,
        "tokens_per_s": sum(tps) / len(tps) if tps else None,
    }


def run_variant(recipe: str, base_overrides: list[str], variant_ov: list[str], out: Path, name: str, *,
                eval_batches: int, log=print) -> dict:
    """Train (unless finished) and evaluate one variant; returns its evaluation record."""
    cfg = C.load(recipe, [*base_overrides, *variant_ov])
    if is_done(out, name, cfg.train.max_steps):
        log(f"[{name}] finished earlier: reusing {run_dir(out, name) / EVAL_FILE}")
        return json.loads((run_dir(out, name) / EVAL_FILE).read_text())
    secs = train_variant(recipe, [*base_overrides, *variant_ov], out, name, log=log)
    res = evaluate_variant(out, name, eval_batches=eval_batches)
    res["wall_s"] = secs
    (run_dir(out, name) / EVAL_FILE).write_text(json.dumps(res, indent=2))
    return res
