"""`moex train|prepare|eval|info|compare|upcycle|generate …` — the command line.

    moex train recipes/chess-tiny.yaml model.moe.num_experts=16 train.max_steps=200
    moex eval runs/chess-tiny
    moex info recipes/gpt2-small-moex.yaml
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys

from moex import config as C
from moex.errors import MoexError, UsageError, storage_error


def _parser(cmd: str | None = None) -> argparse.ArgumentParser:
    """The parser; only the plugin named `cmd` (the subcommand being run) is imported."""
    p = argparse.ArgumentParser(prog="moex", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)

    t = sub.add_parser("train", help="train a recipe (resumes automatically from the run's last checkpoint)")
    t.add_argument("recipe")
    t.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.max_steps=200")
    t.add_argument("--resume", action="store_true", help="require a checkpoint to resume from")
    t.add_argument("--fresh", action="store_true", help="start over: move an existing run directory aside to RUN.old-<time> (train.resume=never)")

    e = sub.add_parser("eval", help="perplexity (own split or any text), load balance, sparsity, chess play strength")
    e.add_argument("path", help="run directory or checkpoint directory")
    e.add_argument("--data", help="evaluate on this text file/directory or hub dataset (hf:NAME) instead of "
                                  "the run's own split, tokenised with the run's tokenizer")
    e.add_argument("--split", help="the run's own split (val|train, default val); with --data hf:NAME, the "
                                   "dataset split (default test)")
    e.add_argument("--hf-config", help="with --data hf:NAME: the dataset configuration (e.g. wikitext-2-raw-v1)")
    e.add_argument("--text-field", default="text", help="with --data hf:NAME: the column holding the text")
    e.add_argument("--stride", type=int, default=0, help="sliding-window evaluation: windows of block_size+1 "
                   "tokens advance S tokens, each scoring only new tokens (1 = full context for every token; "
                   "0 = non-overlapping blocks, same as S = block_size+1)")
    e.add_argument("--words", choices=["whitespace", "eol"], default="whitespace",
                   help="word count for word-level perplexity: whitespace-separated tokens, or those plus one "
                        "end-of-line per line (the convention of published WikiText-2 numbers)")
    e.add_argument("--suite", choices=["ppl", "chess-legal"], default="ppl",
                   help="chess-legal: legal-move rate of sampled moves on held-out game prefixes")
    e.add_argument("--pgn", help="chess-legal: PGN of games to take prefixes from (default: the run's held-out "
                                 "games, or chess/games.pgn under the data root)")
    e.add_argument("--games", type=int, default=100, help="chess-legal: number of games")
    e.add_argument("--engine", help="chess-legal: also play this UCI engine (e.g. stockfish) and report W/D/L")
    e.add_argument("--engine-games", type=int, default=10, help="chess-legal: games against --engine")
    e.add_argument("--seed", type=int, default=0, help="chess-legal: sampling seed")
    e.add_argument("--max-batches", type=int, default=0, help="0 = the whole split")
    e.add_argument("--batch-size", type=int, default=0)
    e.add_argument("--out", help="write the JSON report here (default RUN/eval-<split>.json)")

    i = sub.add_parser("info", help="build a recipe's model on the meta device and print parameter counts")
    i.add_argument("recipe")
    i.add_argument("overrides", nargs="*")

    for name, (module, help_text) in PLUGINS.items():
        if name != cmd:  # listed in `moex --help`; its module is imported only when it runs
            sub.add_parser(name, help=help_text)
            continue
        mod = importlib.import_module(module)
        sp = sub.add_parser(name, help=help_text, description=mod.__doc__,
                            formatter_class=argparse.RawDescriptionHelpFormatter)
        mod.add_arguments(sp)
        sp.set_defaults(plugin=mod)
    return p


def cmd_train(args) -> int:
    if args.resume and args.fresh:
        raise UsageError("--resume and --fresh contradict each other; pass one")
    overrides = list(args.overrides)
    if args.fresh:
        overrides.append("train.resume=never")
    cfg = C.load(args.recipe, overrides)
    from moex import checkpoint
    from moex.training.trainer import train

    if args.resume:
        from pathlib import Path

        ckpts = Path(cfg.train.out_dir) / (cfg.train.run_name or "run") / "checkpoints"
        if checkpoint.latest_tag(ckpts) is None:
            raise UsageError(f"--resume: no checkpoint in {ckpts}")
    train(cfg)
    return 0


def cmd_eval(args) -> int:
    from pathlib import Path

    from moex.eval import report as R

    if args.suite == "chess-legal":
        from moex.eval import chess_legal

        return chess_legal.run(args)
    try:
        if args.data:
            res = R.evaluate_text(args.path, args.data, split=args.split, hf_config=args.hf_config,
                                  text_field=args.text_field, stride=args.stride, words=args.words,
                                  batch_size=args.batch_size)
            name = "eval-" + Path(args.data.removeprefix("hf:").rstrip("/")).name.replace(".", "_")
        else:
            split = args.split or "val"
            if split not in ("val", "train"):
                raise ValueError(f"--split {split!r}: the run's own splits are val and train (hub splits need --data)")
            res = R.evaluate_checkpoint(args.path, split=split, max_batches=args.max_batches,
                                        batch_size=args.batch_size, stride=args.stride, words=args.words)
            name = f"eval-{split}"
    except (ValueError, FileNotFoundError) as e:  # bad path, stride, split or text (DataError is a ValueError)
        print(f"moex: error: {e}", file=sys.stderr)
        return 2
    print(R.format_report(res))
    out = args.out or Path(res["checkpoint"]).parent.parent / f"{name}.json"
    R.write_report(res, out)
    print(f"wrote {out}")
    return 0


def cmd_info(args) -> int:
    from moex.models.info import describe

    cfg = C.load(args.recipe, args.overrides)
    print(json.dumps(describe(cfg), indent=2))
    return 0


COMMANDS = {"train": cmd_train, "eval": cmd_eval, "info": cmd_info}
# Commands that live next to their feature: each module has add_arguments(parser) and run(args).
PLUGINS = {
    "prepare": ("moex.data.command", "tokenize a recipe's data into sharded token files (streaming, parallel, resumable)"),
    "compare": ("moex.compare.command", "train router/expert variants side by side and tabulate them"),
    "upcycle": ("moex.upcycle", "initialise a MoE-X model from a trained dense ReLU checkpoint"),
    "interpret": ("moex.interp.command", "interpretability suites (chess board state, text) on a checkpoint"),
    "train-sae": ("moex.interp.sae_command", "train a sparse autoencoder on a dense model's MLP activations"),
    "import": ("moex.interop.hf_import", "convert a Hugging Face checkpoint (Llama, GPT-2, Mixtral, OLMoE, Qwen2-MoE) into a run"),
    "export": ("moex.interop.export_command", "write a run's model as safetensors + config (moex or Hugging Face layout)"),
    "generate": ("moex.eval.generate", "sample text from a trained run (KV cache; temperature, top-k, top-p)"),
}


def main(argv: list[str] | None = None) -> int:
    # Before torch is imported: torch's CPU allocator then backs blocks >= 2 MiB with
    # transparent huge pages, which cuts the page-fault cost of every fresh activation
    # 3-5x on CPU (benchmarks/results/machine.md). THP_MEM_ALLOC_ENABLE=0 opts out.
    if "torch" not in sys.modules:
        os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")
    from moex.parallel.launch import strip_local_rank

    argv = strip_local_rank(list(sys.argv[1:] if argv is None else argv))
    parser = _parser(next((a for a in argv if not a.startswith("-")), None))
    args, rest = parser.parse_known_args(argv)
    if rest:  # dotted overrides may follow options: `moex compare R --out D train.max_steps=3`
        if not hasattr(args, "overrides") or any(r.startswith("-") for r in rest):
            parser.error(f"unrecognized arguments: {' '.join(rest)}")
        args.overrides += rest
    try:
        if args.cmd in COMMANDS:
            return COMMANDS[args.cmd](args)
        return args.plugin.run(args)
    except (MoexError, OSError) as e:
        return _report_error(e)
    except KeyboardInterrupt:
        if os.environ.get("MOEX_DEBUG", "") not in ("", "0"):
            raise
        print("moex: interrupted", file=sys.stderr)
        return 130


def _report_error(e: BaseException) -> int:
    """`moex: error: <one line>` and exit 2; MOEX_DEBUG=1 re-raises for the traceback.

    MoexError messages already name the key or file. A bare OSError (a file that
    cannot be opened or written) is named by its path and cause; anything else
    is a bug and keeps its traceback.
    """
    if os.environ.get("MOEX_DEBUG", "") not in ("", "0"):
        raise e
    if isinstance(e, OSError) and not isinstance(e, MoexError):
        path = e.filename or ""
        named = storage_error(path, e) if path else None
        msg = str(named) if named else (f"{path}: {e.strerror or e}" if path else str(e))
    else:
        msg = str(e)
    print(f"moex: error: {msg}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
