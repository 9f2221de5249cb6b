"""`moex interpret CKPT --suite chess|text [--sae SAE] --out DIR`.

Measures how interpretable a checkpoint's features are: every dense hidden
unit, MoE-X's wide sparse expert code, per-expert gates, Monet/PEER
sub-expert activations and (with --sae) sparse-autoencoder latents. Writes
DIR/report.json, DIR/report.md and PNG plots.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from moex.errors import UsageError
from moex.output import output_dir


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("path", help="run directory or checkpoint directory")
    p.add_argument("--suite", choices=["chess", "text"], required=True)
    p.add_argument("--out", required=True, help="report directory")
    p.add_argument("--sae", action="append", default=[], help="SAE checkpoint (moex train-sae); repeatable")
    p.add_argument("--pgn", help="chess: PGN of evaluation games (default: the run's own held-out split, "
                                  "or chess/games.pgn under the data root)")
    p.add_argument("--games", type=int, default=1000,
                   help="chess: number of evaluation games; the first half labels features, the second half is "
                        "held out for reconstruction")
    p.add_argument("--all-groups", action="store_true",
                   help="chess: also score coverage of the `piece` and `empty` property groups (slower)")
    p.add_argument("--conllu", help="text: UD treebank for POS probing (default ud-english-ewt dev under the data root)")
    p.add_argument("--sentences", type=int, default=600, help="text: number of UD sentences")
    p.add_argument("--no-probes", action="store_true",
                   help="skip the linear board probes (chess) and k-sparse probing (both suites)")
    p.add_argument("--all-checkpoints", action="store_true",
                   help="score every kept checkpoint of the run into OUT/step-*/ and plot the scores against "
                        "tokens seen (OUT/curve.json, OUT/curve.png)")
    p.add_argument("--batch-size", type=int, default=32)


def run(args) -> int:
    from moex.checkpoint.load import load_model
    from moex.interp import curve, report

    out = Path(args.out)
    if args.all_checkpoints:
        from moex import checkpoint

        run_dir, last = checkpoint.resolve(args.path)
        check_suite_fits(args.suite, load_model(last))
    else:
        loaded = load_model(args.path)
        check_suite_fits(args.suite, loaded)
    with output_dir(out):
        extra = None
        if args.sae:
            from moex.interp.sae_command import sae_extra

            extra = sae_extra(args.sae)
        opts = dict(suite=args.suite, probes=not args.no_probes, sae_extra=extra, pgn=args.pgn, games=args.games,
                    conllu=args.conllu, sentences=args.sentences, batch_size=args.batch_size,
                    all_groups=args.all_groups)
        if args.all_checkpoints:
            points = curve.all_checkpoints(run_dir, out, **opts)
            for p in points:
                print(json.dumps(p))
            print(f"wrote {out / 'curve.json'} and {out / 'curve.png'} ({len(points)} checkpoints)")
            return 0
        res = curve.score(loaded, out, **opts)
    print(report.markdown(res))
    print(f"wrote {out / 'report.json'} and {out / 'report.md'}")
    return 0


def check_suite_fits(suite: str, loaded) -> None:
    """The chess suite reads chess-character models, the text suite the others: refuse a mismatch up front."""
    chess = loaded.cfg.data.tokenizer == "chess"
    if (suite == "chess") != chess:
        raise UsageError(f"--suite {suite} does not fit {loaded.ckpt_dir}: it was trained with data.tokenizer="
                         f"{loaded.cfg.data.tokenizer} (use --suite {'chess' if chess else 'text'})")
