"""The DeepSpeed trainer: one process or many, CPU or GPU, resumable exactly.

Data batches are a pure function of the step, so a checkpoint needs only the
step, the DeepSpeed engine state (model, optimizer, LR schedule) and the RNG
states for a resumed run to reproduce the uninterrupted one bit for bit.
"""

from __future__ import annotations

import json
import math
import os
import pickle
import shutil
import signal
import sys
import time
from pathlib import Path

import torch

from moex import checkpoint
from moex.checkpoint.load import adopt_tokenizer
from moex import config as C
from moex.errors import CheckpointError, TrainingError
from moex.eval.balance import StatsAccumulator, format_balance
from moex.eval.perplexity import evaluate
from moex.training import distributed
from moex.training.resume import apply_schedule, check_model_unchanged, changed_settings, hyperparams
from moex.training.optim import build_optimizer, create_expert_groups, deepspeed_config, mark_expert_params
from moex.training.schedule import lr_at

PREEMPTED_EXIT_CODE = 124
INTERRUPTED_EXIT_CODE = 130  # 128 + SIGINT, as a shell reports Ctrl-C


class Preempted(SystemExit):
    def __init__(self, code: int = PREEMPTED_EXIT_CODE):
        super().__init__(code)


class _Signals:
    """SIGUSR1/SIGTERM, and a first Ctrl-C (SIGINT) once training runs, ask for a checkpoint and
    a clean exit at the next step boundary. A second Ctrl-C, or one during start-up, aborts."""

    PREEMPT, INTERRUPT = 1, 2

    def __init__(self):
        self.requested = 0
        self.armed = False  # set when the training loop starts: before that Ctrl-C just aborts
        self.previous = {}
        for sig in (signal.SIGUSR1, signal.SIGTERM, signal.SIGINT):
            try:
                self.previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread (e.g. under a test runner thread)
                pass

    def restore(self) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)
        self.previous = {}

    def _handle(self, signum, frame):
        if signum == signal.SIGINT:
            if not self.armed or self.requested == self.INTERRUPT:
                raise KeyboardInterrupt
            print("interrupt: writing a checkpoint at the end of this step (Ctrl-C again to abort)",
                  file=sys.stderr, flush=True)
            self.requested = self.INTERRUPT
        else:
            self.requested = max(self.requested, self.PREEMPT)

    def agreed(self) -> int:
        """The strongest request any rank received (0 = none), the same on every rank."""
        flag = torch.tensor([float(self.requested)])
        if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        return int(flag.item())


class Trainer:
    def __init__(self, cfg: C.Config, *, log=print):
        self.cfg, self.log = cfg, log
        self.signals = _Signals()  # before the slow start-up, so an early SIGUSR1 is not fatal
        try:
            self._setup(cfg)
        except BaseException:
            self.signals.restore()
            raise

    def _setup(self, cfg: C.Config) -> None:
        self.info = distributed.init(cfg.deepspeed.skip_shm_comm)
        self.rank, self.world = self.info.rank, self.info.world_size
        ep = cfg.parallel.ep_size
        if self.world % ep:
            raise C.ConfigError(f"parallel.ep_size={ep} needs a world size divisible by it; this run has "
                                f"{self.world} process(es) (launch with torchrun/srun --nproc {ep} or more)")
        self.device = distributed.device_for(self.info)
        if cfg.train.threads:
            torch.set_num_threads(cfg.train.threads)
        elif self.world > 1 and "OMP_NUM_THREADS" not in os.environ and not torch.cuda.is_available():
            # N ranks x all-cores OpenMP threads oversubscribe a CPU node badly (~100x slower).
            local = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("SLURM_NTASKS_PER_NODE", self.world)))
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // local))
        self.run_dir = Path(cfg.train.out_dir) / (cfg.train.run_name or "run")
        self.ckpt_dir = self.run_dir / "checkpoints"
        if cfg.train.resume == "never":
            self._move_aside()
        # What to resume from, and whether it fits this config: decided before anything is written.
        self.resume_from = checkpoint.latest(self.ckpt_dir, warn=self._say) if cfg.train.resume == "auto" else None
        self.resume_meta = None
        if self.resume_from is not None:
            self.resume_meta = checkpoint.read_meta(self.resume_from)
            if checkpoint.is_weights_only(self.resume_from):
                raise TrainingError(
                    f"{self.resume_from} holds weights only (an imported model, no optimizer state): fine-tune it "
                    f"in another run with train.init_from={self.run_dir}")
            check_model_unchanged(self.resume_meta.get("config", {}), cfg, self.resume_from)
        created = not self.run_dir.exists()
        try:
            self._build()
        except BaseException:
            # A run that fails while being set up (bad data, a config that does not build)
            # leaves nothing behind when this call created its directory.
            if created and self.rank == 0:
                shutil.rmtree(self.run_dir, ignore_errors=True)
            raise

    # ------------------------------------------------------------------ setup
    def _build(self) -> None:
        from moex.data import build_data
        from moex.models import GPT
        from moex.models.transformer import param_counts

        cfg = self.cfg
        if self.rank == 0:  # rank 0 tokenizes and fills the cache; the others then read it
            self.run_dir.mkdir(parents=True, exist_ok=True)
            if cfg.train.init_from:
                adopt_tokenizer(cfg.train.init_from, self.run_dir)
            self.data = build_data(cfg.data, cfg.model.block_size, tokenizer_dir=self.run_dir / "tokenizer")
        distributed.barrier()
        if self.rank != 0:
            self.data = build_data(cfg.data, cfg.model.block_size, tokenizer_dir=self.run_dir / "tokenizer")
        if cfg.model.vocab_size <= 0:
            cfg.model.vocab_size = self.data.tokenizer.vocab_size
        if self.rank == 0:
            (self.run_dir / "config.yaml").write_text(C.dump(cfg))
        torch.manual_seed(cfg.train.seed)
        model = GPT(cfg.model)
        if cfg.train.init_from and self.resume_from is None:
            _load_initial_weights(model, cfg.train.init_from)
            self._say(f"initialised weights from {cfg.train.init_from}")
        self.counts = param_counts(model)
        if cfg.parallel.ep_size > 1:
            # Expert weights are sharded: DeepSpeed must reduce them over the
            # expert-data-parallel group only. With ep_size 1 they are ordinary
            # data-parallel parameters and DeepSpeed's dense path is exact.
            from moex.parallel.expert import setup_expert_parallel

            create_expert_groups(cfg.parallel.ep_size)
            mark_expert_params(model, cfg.parallel.ep_size)
            setup_expert_parallel(model, cfg.parallel.ep_size)
        model.to(self.device)
        optimizer = build_optimizer(model, cfg.optim)
        sched = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda s: lr_at(s, cfg.optim, cfg.train.max_steps) / cfg.optim.lr
        )
        import deepspeed

        self.engine, _, _, self.scheduler = deepspeed.initialize(
            model=model, optimizer=optimizer, lr_scheduler=sched, config=deepspeed_config(cfg, self.world)
        )
        self.model = self.engine.module
        if cfg.parallel.ep_size > 1:  # expert parallelism: DeepSpeed's no-ZeRO clipping norm is not global
            from moex.parallel.expert import install_exact_grad_clipping

            install_exact_grad_clipping(self.engine, cfg.parallel.ep_size)

    def _say(self, msg: str) -> None:
        if self.rank == 0:
            self.log(msg)

    def _move_aside(self) -> None:
        """`--fresh` (train.resume=never) in a used run directory: move the old run to RUN.old-<time>,
        so two histories never share one directory and nothing of the old one is lost."""
        if self.rank == 0 and self.run_dir.exists() and any(self.run_dir.iterdir()):
            stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
            dest, n = self.run_dir.with_name(f"{self.run_dir.name}.old-{stamp}"), 1
            while dest.exists():
                dest, n = self.run_dir.with_name(f"{self.run_dir.name}.old-{stamp}-{n}"), n + 1
            os.rename(self.run_dir, dest)
            self._say(f"fresh start: moved the previous run to {dest}")
        distributed.barrier()

    # ------------------------------------------------------------------ checkpoints
    def _resume(self) -> int:
        """Load the chosen checkpoint (an older complete one if it fails to load); returns its step."""
        if self.resume_from is None:
            return 0
        # DeepSpeed's loader when the parallel layout is unchanged; otherwise moex reshards
        # (experts, Adam state) by parameter name. See moex.checkpoint.reshard.
        from moex.checkpoint import reshard

        fresh = hyperparams(self.engine)
        older = [p for p in reversed(checkpoint.list_checkpoints(self.ckpt_dir))
                 if (checkpoint.step_of(p) or 0) < (checkpoint.step_of(self.resume_from) or 0)]
        for ckpt in [self.resume_from, *older]:
            try:
                client = reshard.resume(self.engine, self.ckpt_dir, ckpt.name, self.cfg, self.world)
                break
            except (CheckpointError, RuntimeError, EOFError, OSError, KeyError, ValueError, pickle.UnpicklingError) as e:
                reason = str(e).splitlines()[0] if str(e) else type(e).__name__
                if ckpt is (older[-1] if older else self.resume_from):
                    raise CheckpointError(f"no checkpoint in {self.ckpt_dir} can be loaded ({ckpt.name}: {reason}); "
                                          f"start over with --fresh (the run is moved aside)") from e
                self._say(f"warning: cannot load {ckpt} ({reason}); falling back to an older checkpoint")
        apply_schedule(self.engine, self.scheduler, fresh, self.cfg)
        notes = changed_settings(checkpoint.read_meta(ckpt).get("config", {}), self.cfg)
        if notes:
            self._say(f"resume: changed since the checkpoint, in effect from step {client['step']}: {', '.join(notes)}")
        checkpoint.set_rng_state(client["rng"][self.rank] if self.rank < len(client["rng"]) else client["rng"][0])
        self._say(f"resumed from {ckpt} (step {client['step']})")
        return client["step"]

    def save(self, step: int) -> Path:
        rngs = [None] * self.world
        if self.world > 1:
            torch.distributed.all_gather_object(rngs, checkpoint.rng_state())
        else:
            rngs = [checkpoint.rng_state()]
        client = {"step": step, "rng": rngs, "config": C.to_dict(self.cfg), "world_size": self.world}
        from moex.checkpoint import reshard

        return checkpoint.save(
            self.engine, self.ckpt_dir, step, client, rank=self.rank, barrier=distributed.barrier,
            keep=self.cfg.train.keep_checkpoints, extra_writer=reshard.save,
        )

    # ------------------------------------------------------------------ loop
    def train(self) -> dict:
        if not self.signals.previous:  # a second train() on the same trainer
            self.signals = _Signals()
        try:
            return self._train()
        finally:
            self.signals.restore()

    def _train(self) -> dict:
        cfg, tc = self.cfg, self.cfg.train
        start = self._resume()
        metrics_path = self.run_dir / "metrics.jsonl"
        if self.rank == 0:
            truncate_metrics(metrics_path, start, warn=self._say)
            self._say(
                f"moex train: {self.run_dir}  params total {self.counts['total']:,} active {self.counts['active']:,}  "
                f"world {self.world}  steps {start}->{tc.max_steps}"
            )
        writer = _tensorboard(self.run_dir) if self.rank == 0 else None
        signals = self.signals
        acc = StatsAccumulator()
        last = {}
        bar = _progress(start, tc.max_steps, enabled=tc.progress and self.rank == 0)
        t0, tokens = time.time(), 0
        self.engine.train()
        signals.armed = True
        for step in range(start, tc.max_steps):
            loss = self._step(step, acc)
            tokens += tc.batch_size * tc.grad_accum * cfg.model.block_size * self.world
            rec = {"step": step + 1, "loss": loss, "lr": self.scheduler.get_last_lr()[0]}
            if (step + 1) % tc.log_interval == 0 or step + 1 == tc.max_steps:
                rec["tokens_per_s"] = tokens / max(1e-9, time.time() - t0)
                rec["layers"] = acc.summary()
                acc = StatsAccumulator()
            if (step + 1) % tc.eval_interval == 0 or step + 1 == tc.max_steps:
                rec["val"] = self._eval()
                self._report(step + 1, rec, bar)
            if tc.interp_interval and (step + 1) % tc.interp_interval == 0 and self.rank == 0:
                rec["interp"] = self._interp(step + 1)
            if self.rank == 0:
                _append_jsonl(metrics_path, rec)
                _log_tb(writer, rec)
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{loss:.4f}")
            last = rec
            done = step + 1 == tc.max_steps
            if done or (step + 1) % tc.ckpt_interval == 0:
                self.save(step + 1)
            request = 0 if done else signals.agreed()
            if request:
                if (step + 1) % tc.ckpt_interval:
                    self.save(step + 1)
                if request == signals.INTERRUPT:
                    self._say(f"interrupted: checkpoint at step {step + 1} written; run the same command to resume")
                    raise Preempted(INTERRUPTED_EXIT_CODE)
                self._say(f"preempted: checkpoint at step {step + 1} written; exiting with {PREEMPTED_EXIT_CODE}")
                raise Preempted()
        if bar is not None:
            bar.close()
        if writer is not None:
            writer.close()
        return last

    def _step(self, step: int, acc: StatsAccumulator) -> float:
        tc = self.cfg.train
        total = 0.0
        for micro in range(tc.grad_accum):
            x, y = self.data.train.get_batch(
                step * tc.grad_accum + micro, tc.batch_size, rank=self.rank, world_size=self.world
            )
            out = self.engine(x.to(self.device), y.to(self.device))
            self.engine.backward(out.loss)
            self.engine.step()
            total += float(out.loss.detach())
            acc.add(out.layer_stats)
        for m in self.model.modules():  # per-step state updates, e.g. aux-loss-free router biases
            if hasattr(m, "post_step"):
                m.post_step()
        loss = total / tc.grad_accum
        if self.world > 1:
            # Log the global batch's loss (so N ranks x B log what 1 rank x N*B does),
            # and let every rank see the same value for the check below.
            t = torch.tensor([loss], dtype=torch.float64)
            torch.distributed.all_reduce(t)
            loss = t.item() / self.world
        if not math.isfinite(loss):
            raise TrainingError(
                f"non-finite loss ({loss}) at step {step + 1}; stopping. The last good checkpoint in "
                f"{self.ckpt_dir} is untouched (lower optim.lr or check the data)."
            )
        return loss

    def _eval(self) -> dict:
        tc = self.cfg.train
        return evaluate(self.model, self.data.val, batch_size=tc.batch_size, max_batches=tc.eval_batches, device=self.device)

    def _interp(self, step: int) -> dict:
        """Score the live model (chess suite for a chess tokenizer, else the text suite) into RUN/interp/."""
        from moex.checkpoint.load import Loaded
        from moex.interp import curve

        cfg = self.cfg
        suite = "chess" if cfg.data.tokenizer == "chess" else "text"
        tag = checkpoint.tag_for(step)
        was_training = self.model.training
        self.model.eval()
        try:
            loaded = Loaded(cfg, self.model, self.run_dir, self.ckpt_dir / tag, step)
            res = curve.score(loaded, self.run_dir / "interp" / tag, suite=suite, games=cfg.train.interp_games,
                              sentences=cfg.train.interp_games, progress=False)
        finally:
            self.model.train(was_training)
        point = {**curve.summary(res), "tokens": curve.tokens_seen(cfg, step, self.world)}
        curve.add_point(self.run_dir / "interp", point)
        self._say(f"step {step:>6}  interp " + "  ".join(
            f"{k} {v:.3f}" for k, v in point.items() if isinstance(v, float)))
        return point

    def _report(self, step: int, rec: dict, bar) -> None:
        v = rec["val"]
        msg = (
            f"step {step:>6}  train {rec['loss']:.4f}  val {v['loss']:.4f}  ppl {v['ppl']:.3f}  "
            f"lr {rec['lr']:.2e}  tok/s {rec.get('tokens_per_s', 0):,.0f}"
        )
        bal = format_balance(v["layers"])
        text = msg + ("\n" + bal if bal else "")
        if bar is not None:
            bar.write(text)
        else:
            self._say(text)


def _load_initial_weights(model, path: str) -> None:
    p = Path(path)
    if p.is_dir():
        _, ckpt = checkpoint.resolve(p)
        state = checkpoint.load_model_state(ckpt)
    elif p.exists():
        state = torch.load(p, map_location="cpu")
    else:
        raise FileNotFoundError(f"train.init_from: {p} does not exist")
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.endswith("lm_head.weight")]  # tied to wte
    if missing or unexpected:
        raise ValueError(f"train.init_from={path}: weights do not fit the model (missing {missing}, unexpected {unexpected})")


def _progress(start: int, total: int, enabled: bool):
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=total, initial=start, desc="train", dynamic_ncols=True)


def _tensorboard(run_dir: Path):
    from torch.utils.tensorboard import SummaryWriter

    return SummaryWriter(str(run_dir / "tb"))


def _log_tb(writer, rec: dict) -> None:
    if writer is None:
        return
    step = rec["step"]
    writer.add_scalar("train/loss", rec["loss"], step)
    writer.add_scalar("train/lr", rec["lr"], step)
    if "val" in rec:
        writer.add_scalar("val/loss", rec["val"]["loss"], step)
        writer.add_scalar("val/ppl", rec["val"]["ppl"], step)
    for row in rec.get("layers", []):
        for k in ("cv", "maxvio", "router_entropy", "active_frac"):
            if k in row:
                writer.add_scalar(f"layer{row['layer']}/{k}", row[k], step)


def _append_jsonl(path: Path, rec: dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(rec) + "\n")


def truncate_metrics(path: Path, step: int, warn=None) -> None:
    """On (re)start at `step`, drop the records written after it; a torn last line (a kill
    mid-write) is dropped with a warning, any other unreadable line is an error naming it."""
    if not path.exists():
        return
    lines = path.read_text(errors="replace").splitlines()
    keep = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            if i == len(lines) - 1:
                if warn is not None:
                    warn(f"warning: {path}:{i + 1}: torn last line (a kill while it was written) dropped")
                break
            raise CheckpointError(f"{path}:{i + 1}: not a JSON record; fix or remove that line") from None
        if rec.get("step", 0) <= step:
            keep.append(line)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(l + "\n" for l in keep))
    os.replace(tmp, path)


def train(cfg: C.Config, *, log=print) -> dict:
    """Train `cfg` to `train.max_steps` (resuming when a checkpoint exists); returns the last record."""
    return Trainer(cfg, log=log).train()
