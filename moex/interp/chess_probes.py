"""Chess diagnostics beside Karvonen's metrics: residual-stream board probes and k-sparse probing.

Shape key: P positions, D model dim, F features, Q properties.

- `board_probe`: per layer, a 64-square x 13-class linear probe of the residual
  stream after that block (`L{i}.resid`), trained on the labelling games and
  scored on held-out games, beside the per-square majority class.
- `ksparse`: per feature source and property group, the held-out F1 of the best
  probe restricted to k features (k = 1, 2, 4, 8, 16; moex.interp.ksparse).
"""

from __future__ import annotations

import numpy as np

from moex.interp import ksparse, probe

# Groups k-sparse probing scores by default: the headline pieces and the non-piece state.
# (`piece` is left out: it repeats `piece_masked` plus pieces on their starting squares.)
KSPARSE_GROUPS = ("piece_masked", "empty", "castling", "en_passant", "check", "material")


def board_probe(a_train_PD, a_test_PD, labels_train_PQ, labels_test_PQ, slices: dict[str, slice]) -> dict:
    """Board probe of one residual stream; the square classes come from the `piece` property group."""
    sq_tr = probe.square_classes(labels_train_PQ[:, slices["piece"]])
    sq_te = probe.square_classes(labels_test_PQ[:, slices["piece"]])
    return probe.board_probe(a_train_PD, sq_tr, a_test_PD, sq_te)


def ksparse_scores(a_train_PF, a_test_PF, labels_train_PQ, labels_test_PQ, slices: dict[str, slice], *,
                   groups=KSPARSE_GROUPS, ks=ksparse.KS, rank: str = "f_stat") -> dict:
    """{group: {"probed", "properties", "f1": {k: mean held-out F1}}} for one feature source."""
    groups = [g for g in groups if g in slices]
    cols = np.concatenate([np.arange(slices[g].start, slices[g].stop) for g in groups])
    sub, start = {}, 0
    for g in groups:  # the chosen groups' columns, packed side by side
        n = slices[g].stop - slices[g].start
        sub[g] = slice(start, start + n)
        start += n
    res = ksparse.probe_properties(a_train_PF, labels_train_PQ[:, cols], a_test_PF, labels_test_PQ[:, cols],
                                   ks=ks, rank=rank)
    return ksparse.summarise(res, sub)
