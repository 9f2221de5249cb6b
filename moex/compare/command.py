"""`moex compare RECIPE --routers a,b,... [--out DIR] [--interp chess|text] [overrides...]`.

Each variant = the recipe + the variant's overrides (moex.compare.variants) + the
command-line overrides, trained in a fresh process with the same data, seed and
token budget, then evaluated; a variant already finished is not retrained.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Callable, Optional

from moex import config as C
from moex.compare.report import write_report
from moex.compare.runner import run_variant
from moex.compare.variants import DEFAULT, VARIANTS, variant_overrides
from moex.errors import UsageError


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("recipe", help="base recipe: data, model size (model.d_ff = dense width to match), train budget")
    p.add_argument("overrides", nargs="*", help="dotted overrides applied to every variant")
    p.add_argument("--routers", default=DEFAULT, help=f"comma-separated variants from: {', '.join(VARIANTS)}")
    p.add_argument("--out", default=None, help="output directory (default runs/compare-<recipe stem>)")
    p.add_argument("--no-match", action="store_true", help="do not derive sizes for matched active parameters")
    p.add_argument("--eval-batches", type=int, default=0, help="validation batches per variant (0 = the recipe's train.eval_batches)")
    p.add_argument("--interp", choices=["chess", "text"], help="also score each variant with this interpretability "
                   "suite and add its columns (probe accuracy, coverage, reconstruction, k-sparse F1)")
    p.add_argument("--interp-games", type=int, default=1000, help="--interp chess: evaluation games")
    p.add_argument("--interp-sentences", type=int, default=600, help="--interp text: UD sentences")
    p.add_argument("--pgn", help="--interp chess: PGN of evaluation games (default: each run's held-out split, "
                                 "or chess/games.pgn under the data root)")
    p.add_argument("--conllu", help="--interp text: UD treebank (default ud-english-ewt dev under the data root)")


def compare(recipe: str, names: list[str], out: Path, overrides: list[str], *, match: bool = True,
            eval_batches: int = 0, extra: Optional[Callable[[str, Path, dict], dict]] = None, log=print) -> dict:
    """Train/evaluate each variant and write the report. `extra(variant, run_dir, eval) -> {column: value}`."""
    base = C.load(recipe, overrides)
    batches = eval_batches or base.train.eval_batches
    out.mkdir(parents=True, exist_ok=True)
    plan = {n: variant_overrides(n, base.model.d_ff, match=match) for n in names}
    from moex.models.info import describe

    for n, ov in plan.items():  # check every variant builds before spending time training any
        d = describe(C.load(recipe, [*overrides, *ov]))
        log(f"{n:>14}: params total {d['params_total']:>10,}  active {d['params_active']:>10,}   {' '.join(ov)}")
    results, extra_cols = {}, {}
    for n, ov in plan.items():
        results[n] = run_variant(recipe, overrides, ov, out, n, eval_batches=batches, log=log)
        r = results[n]
        log(f"[{n}] val loss {r['loss']:.4f}  ppl {r['ppl']:.3f}")
        if extra is not None:
            for col, v in extra(n, out / "runs" / n, r).items():
                extra_cols.setdefault(col, {})[n] = v
    return write_report(out, results, recipe=recipe, overrides=overrides, extra=extra_cols)


def run(args) -> int:
    names = [n.strip() for n in args.routers.split(",") if n.strip()]
    if not names:
        raise UsageError(f"--routers names no variant; give a comma-separated list from: {', '.join(VARIANTS)}")
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        raise UsageError(f"--routers: unknown variants {unknown}; valid: {', '.join(VARIANTS)}")
    out = Path(args.out or f"runs/compare-{Path(args.recipe).stem}")
    extra = None
    if args.interp:
        from moex.compare.interp import check_recipe, interp_columns

        check_recipe(args.interp, C.load(args.recipe, list(args.overrides)))  # before any training

        extra = interp_columns(args.interp, pgn=args.pgn, games=args.interp_games, conllu=args.conllu,
                               sentences=args.interp_sentences)
    payload = compare(args.recipe, names, out, list(args.overrides), match=not args.no_match,
                      eval_batches=args.eval_batches, extra=extra)
    print((out / "compare.md").read_text())
    print(f"wrote {out / 'compare.json'}, {out / 'compare.md'} and {len(list(out.glob('*.png')))} plots")
    return 0 if payload["rows"] else 1


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="moex compare", description=__doc__)
    add_arguments(p)
    return run(p.parse_intermixed_args(argv))  # overrides may follow the options


if __name__ == "__main__":
    raise SystemExit(main())
