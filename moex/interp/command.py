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


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("path", help="run directory or checkpoint directory")
    p.add_argument("--suite", choices=["chess", "text"], required=True)
    p.add_argument("--out", required=True, help="report directory")
    p.add_argument("--sae", action="append", default=[], help="SAE checkpoint (moex train-sae); repeatable")
    p.add_argument("--pgn", help="chess: PGN of evaluation games (default: the run's own held-out split, "
                                  "or chess/games.pgn under the data root)")
    p.add_argument("--games", type=int, default=1000, help="chess: number of evaluation games")
    p.add_argument("--conllu", help="text: UD treebank for POS probing (default ud-english-ewt dev under the data root)")
    p.add_argument("--sentences", type=int, default=600, help="text: number of UD sentences")
    p.add_argument("--no-probes", action="store_true",
                   help="skip the linear board probes (chess) and k-sparse probing (both suites)")
    p.add_argument("--all-checkpoints", action="store_true",
                   help="score every kept checkpoint of the run into OUT/step-*/ and plot the scores against "
                        "tokens seen (OUT/curve.json, OUT/curve.png)")
    p.add_argument("--batch-size", type=int, default=32)


def run(args) -> int:
    from moex.eval.load import load_model
    from moex.interp import curve, report

    out = Path(args.out)
    extra = None
    if args.sae:
        from moex.interp.sae_command import sae_extra

        extra = sae_extra(args.sae)
    opts = dict(suite=args.suite, probes=not args.no_probes, sae_extra=extra, pgn=args.pgn, games=args.games,
                conllu=args.conllu, sentences=args.sentences, batch_size=args.batch_size)
    if args.all_checkpoints:
        from moex.training import checkpoint

        run_dir, _ = checkpoint.resolve(args.path)
        points = curve.all_checkpoints(run_dir, out, **opts)
        for p in points:
            print(json.dumps(p))
        print(f"wrote {out / 'curve.json'} and {out / 'curve.png'} ({len(points)} checkpoints)")
        return 0
    res = curve.score(load_model(args.path), out, **opts)
    print(report.markdown(res))
    print(f"wrote {out / 'report.json'} and {out / 'report.md'}")
    return 0
