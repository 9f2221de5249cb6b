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
    p.add_argument("--batch-size", type=int, default=32)


def run(args) -> int:
    from moex.eval.load import load_model
    from moex.interp import report

    loaded = load_model(args.path)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    extra = None
    if args.sae:
        from moex.interp.sae_command import sae_extra

        extra = sae_extra(args.sae)
    if args.suite == "chess":
        from moex.interp import chess_suite

        res = chess_suite.run(loaded, out_dir=out, pgn=args.pgn, n_games=args.games, batch_size=args.batch_size,
                              sae_extra=extra, probes=not args.no_probes)
    else:
        from moex.interp import text_suite

        res = text_suite.run(loaded, out_dir=out, conllu=args.conllu, max_sentences=args.sentences,
                             batch_size=args.batch_size, sae_extra=extra, probes=not args.no_probes)
    res.update({"checkpoint": str(loaded.ckpt_dir), "step": loaded.step, "suite": args.suite})
    (out / "report.json").write_text(json.dumps(res, indent=2))
    md = report.markdown(res)
    (out / "report.md").write_text(md)
    report.plots(res, out)
    print(md)
    print(f"wrote {out / 'report.json'} and {out / 'report.md'}")
    return 0
