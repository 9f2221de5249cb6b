"""Interpretability columns for `moex compare --interp chess|text`.

After a variant is trained and evaluated, its final checkpoint is scored with
the chess board-state suite or the text (UD POS) suite into
OUT/runs/<variant>/interp-<suite>/ (reused when its report.json exists), and the
headline numbers become columns of the compare table, beside val loss, balance
and tokens/s: the best layer's board-probe accuracy and its majority baseline,
the best source's coverage and reconstruction, and the best source's k-sparse F1
at k = 1 and 16 (chess: the `piece_masked` properties; text: UPOS tags).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

COLUMNS = {  # curve.summary key -> compare column
    "chess": {"probe_accuracy": "probe acc", "majority_baseline": "probe majority", "coverage": "coverage",
              "reconstruction": "reconstruction", "ksparse_f1_k1": "k-sparse F1 k=1",
              "ksparse_f1_k16": "k-sparse F1 k=16"},
    "text": {"mean_best_f1": "POS mean best F1", "ksparse_f1_k1": "k-sparse F1 k=1",
             "ksparse_f1_k16": "k-sparse F1 k=16"},
}


def check_recipe(suite: str, cfg) -> None:
    """The chess suite reads 256-character games: refuse a recipe whose context is shorter, before training."""
    from moex.errors import ConfigError
    from moex.interp.chess_suite import MAX_CHARS

    if suite == "chess" and cfg.model.block_size < MAX_CHARS:
        raise ConfigError(f"model.block_size={cfg.model.block_size}: --interp chess needs >= {MAX_CHARS} "
                          f"(games are read {MAX_CHARS} characters at a time); override model.block_size={MAX_CHARS}")


def interp_columns(suite: str, *, log=print, **opts) -> Callable[[str, Path, dict], dict]:
    """A compare `extra` callback scoring each variant with `suite` (options as moex.interp.curve.score)."""
    if suite not in COLUMNS:
        raise ValueError(f"unknown interpretability suite {suite!r}; valid: {', '.join(COLUMNS)}")

    def extra(name: str, run_dir: Path, _eval: dict) -> dict:
        from moex.checkpoint.load import load_model
        from moex.interp import curve

        out = Path(run_dir) / f"interp-{suite}"
        if (out / "report.json").exists():
            res = json.loads((out / "report.json").read_text())
        else:
            log(f"[{name}] interpretability ({suite} suite) -> {out}")
            res = curve.score(load_model(run_dir), out, suite=suite, progress=False, **opts)
        s = curve.summary(res)
        return {col: s.get(key) for key, col in COLUMNS[suite].items()}

    return extra
