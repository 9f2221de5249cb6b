"""Board-state-property metrics (Karvonen et al.'s SAE_BoardGameEval; as used by MoE-X).

Shape key: P positions, F features (f: a chunk of them), Q properties, T thresholds,
S squares, C classes per square.

Conventions, replicated from the reference code (circuits/eval_sae_as_classifier.py,
analysis.py, f1_analysis.py, eval_board_reconstruction.py, full_pipeline.py):
- Firing scale: max_f = |max over the train-side sample of feature f| (abs *after*
  the max). A feature fires when its activation > t x max_f, t in {0, 0.1, ..., 1.0}.
  The scale is >= 0, so the firing sets are nested in t, and a zero never fires.
- F1 with eps = 1e-8 everywhere.
- Coverage: per threshold, the best single feature's F1 for each property, averaged
  over *all* properties (absent ones count 0); the max over thresholds; train set.
- Labels: at each threshold a feature gets every property with precision >= 0.95
  (inclusive) and >= 10 true positives on the train set.
- Reconstruction on held-out positions: at threshold slot t (0 ... 0.9) a property is
  predicted when any labelled feature of slot t fires. Slot 1.0 holds the "max-active"
  variant: each firing feature contributes the labels of the highest threshold slot
  at which it fires *and* has labels (slot 0's labels when there is none). Counts
  are summed over positions x squares x classes. F1 per class: TP / FP / FN of those
  counts. F1 per square: a square is right only when its true class is predicted and
  nothing else is -- TP minus the squares with exactly one TP and exactly one FP
  (FP and FN unchanged, as in the reference). The headline is the per-class F1 at the
  slot (of 0 ... 0.9) with the best per-square F1 (first on ties); per-square F1 and
  the max-active F1 are reported beside it.

Activations are dense arrays (P, F) or scipy CSR matrices; neither is densified whole.
All (feature, property) counts at a threshold are one product of a {0,1} firing matrix
and the label matrix, over chunks of features: a BLAS product for dense blocks, sparse x
sparse for sparse ones (a dense block with < 5% non-zeros is handled as sparse; zeros
never fire, since t x max_f >= 0).
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp

THRESHOLDS = tuple(round(0.1 * i, 1) for i in range(11))
EPS = 1e-8
CHUNK = 1024  # features per block of a dense source
SPARSE_CHUNK = 4096  # features per block of a sparse source
SPARSE_BELOW = 0.05  # a dense block with fewer non-zeros than this is handled as a sparse one


def is_sparse(a) -> bool:
    return sp.issparse(a)


def feature_max(acts_PF) -> np.ndarray:
    """max_F: |max over the sample| of each feature (Karvonen: abs of the max, not max of abs)."""
    if acts_PF.shape[0] == 0:
        return np.zeros(acts_PF.shape[1], dtype=np.float32)
    if is_sparse(acts_PF):  # implicit zeros count, as in the dense matrix
        return np.abs(np.asarray(acts_PF.max(axis=0).todense()).ravel()).astype(np.float32)
    return np.abs(np.asarray(acts_PF).max(0)).astype(np.float32)


def _blocks(acts_PF, chunk: int | None = None):
    """(start, end, block) over feature chunks: a dense float32 array or a CSC matrix."""
    F = acts_PF.shape[1]
    if is_sparse(acts_PF):
        csc = acts_PF.tocsc()
        step = chunk or SPARSE_CHUNK
        for s in range(0, F, step):
            yield s, min(F, s + step), csc[:, s : s + step]
    else:
        step = chunk or CHUNK
        for s in range(0, F, step):
            b = np.asarray(acts_PF[:, s : s + step], dtype=np.float32)
            yield s, min(F, s + step), sp.csc_matrix(b) if np.count_nonzero(b) < SPARSE_BELOW * b.size else b


def fires(block, thr_f: np.ndarray):
    """Firing matrix: a dense bool array, or a CSC {0,1} float32 matrix for a sparse block."""
    if not is_sparse(block):
        return block > thr_f[None, :]
    col_N = np.repeat(np.arange(block.shape[1]), np.diff(block.indptr))
    on = block.data > thr_f[col_N]
    out = sp.csc_matrix((np.ones(int(on.sum()), np.float32), block.indices[on],
                         np.concatenate([[0], np.cumsum(np.bincount(col_N[on], minlength=block.shape[1]))])),
                        shape=block.shape)
    return out


def _alive(block) -> int:
    """Features of the block that are ever > 0."""
    if not is_sparse(block):
        return int((block > 0).any(0).sum())
    col_N = np.repeat(np.arange(block.shape[1]), np.diff(block.indptr))
    return int(np.unique(col_N[block.data > 0]).size)


def _nnz(f) -> int:
    return int(f.nnz) if is_sparse(f) else int(np.count_nonzero(f))


class Labels:
    """The label matrix (P, Q) as the products need it: CSR (sparse firing) and dense float32 (BLAS)."""

    def __init__(self, labels_PQ: np.ndarray):
        labels_PQ = np.asarray(labels_PQ, dtype=bool)
        self.csr = sp.csr_matrix(labels_PQ, dtype=np.float32)
        self.dense = labels_PQ.astype(np.float32)  # BLAS operand (counts are exact in float32 below 2^24)
        self.actual_Q = labels_PQ.sum(0).astype(np.float32)
        self.shape = labels_PQ.shape


def tp_counts(f, labels: Labels):
    """(tp_fQ, pred_f) of a firing matrix: true positives of every (feature, property) and
    predicted positives per feature. Dense: one BLAS product with the dense labels; sparse:
    sparse x sparse. Nothing firing costs nothing."""
    Fc = f.shape[1]
    if _nnz(f) == 0:
        return np.zeros((Fc, labels.shape[1]), np.float32), np.zeros(Fc, np.float32)
    if not is_sparse(f):
        return f.T.astype(np.float32) @ labels.dense, np.count_nonzero(f, axis=0).astype(np.float32)
    tp = (f.T.tocsr() @ labels.csr).toarray().astype(np.float32)
    return tp, np.diff(f.tocsc().indptr).astype(np.float32)


def f1_matrix(tp_FQ, pred_F, actual_Q):
    """(f1_FQ, precision_FQ) with Karvonen's eps = 1e-8."""
    precision = tp_FQ / (pred_F[:, None] + EPS)
    recall = tp_FQ / (actual_Q[None, :] + EPS)
    return 2 * precision * recall / (precision + recall + EPS), precision


def is_label(tp_FQ, pred_F, *, min_precision: float = 0.95, min_tp: int = 10) -> np.ndarray:
    """L_FQ: precision >= min_precision (inclusive, exact on integer counts) and tp >= min_tp."""
    slack = 1e-6 * np.maximum(pred_F, 1.0)  # 0.95 * 20 must count as 19 despite float rounding
    return (tp_FQ.astype(np.float64) >= min_precision * pred_F.astype(np.float64)[:, None] - slack[:, None]) & (
        tp_FQ >= min_tp)


def levels(block, max_f: np.ndarray, thresholds) -> np.ndarray:
    """How many thresholds each activation of a dense block exceeds (it fires at slots 0 ... level-1)."""
    lv = np.zeros(block.shape, np.uint8)
    for t in thresholds:
        lv += block > t * max_f[None, :]
    return lv


class TrainPass:
    """One pass over the train-side features: best F1 per (threshold, property) and the labels.

    best_TQ / arg_TQ: the best single feature's F1 and its index, for every label column;
    labels[t]: CSR (F, Qh) bool of the labels at threshold t on the `label_cols` columns.
    """

    def __init__(self, acts_PF, labels_PQ, *, label_cols: slice | None = None, thresholds=THRESHOLDS,
                 min_precision: float = 0.95, min_tp: int = 10, chunk: int | None = None):
        self.thresholds = tuple(thresholds)
        lab = Labels(labels_PQ)
        P, Q = lab.shape
        F = acts_PF.shape[1]
        T = len(self.thresholds)
        self.max_F = feature_max(acts_PF)
        self.best_TQ = np.zeros((T, Q), np.float32)
        self.arg_TQ = np.full((T, Q), -1, np.int64)
        self.label_cols = label_cols or slice(0, Q)
        self.present_Q = lab.actual_Q > 0
        self.alive = 0
        lab_rows = [[] for _ in range(T)]
        lab_cols = [[] for _ in range(T)]
        for s, e, block in _blocks(acts_PF, chunk):
            self.alive += _alive(block)
            for i, t in enumerate(self.thresholds):
                tp_fQ, pred_f = tp_counts(fires(block, t * self.max_F[s:e]), lab)
                f1_fQ = f1_matrix(tp_fQ, pred_f, lab.actual_Q)[0]
                top_Q = f1_fQ.argmax(0)
                val_Q = f1_fQ[top_Q, np.arange(Q)]
                better = val_Q > self.best_TQ[i]
                self.best_TQ[i, better], self.arg_TQ[i, better] = val_Q[better], s + top_Q[better]
                r, c = is_label(tp_fQ[:, self.label_cols], pred_f, min_precision=min_precision,
                                min_tp=min_tp).nonzero()
                lab_rows[i].append(r + s)
                lab_cols[i].append(c)
        self.dead = F - self.alive
        Qh = len(range(Q)[self.label_cols])
        self.labels = [sp.csr_matrix((np.ones(sum(map(len, r)), bool), (np.concatenate(r or [[]]).astype(np.int64),
                                      np.concatenate(c or [[]]).astype(np.int64))), shape=(F, Qh))
                       for r, c in zip(lab_rows, lab_cols)]

    def coverage(self, cols: slice | None = None, names: list[str] | None = None) -> dict:
        """Coverage over the columns `cols` (default all): score, threshold, per_threshold, ..."""
        cols = cols or slice(0, self.best_TQ.shape[1])
        best_TQ = self.best_TQ[:, cols]
        per_t = best_TQ.mean(1) if best_TQ.shape[1] else np.zeros(len(self.thresholds))
        i = int(per_t.argmax())
        present_Q = self.present_Q[cols]
        out = {"score": float(per_t[i]), "threshold": self.thresholds[i],
               "per_threshold": {str(t): float(v) for t, v in zip(self.thresholds, per_t)},
               "properties": int(best_TQ.shape[1]), "present": int(present_Q.sum()),
               "alive": self.alive, "dead": self.dead}
        if names is not None:
            arg_Q = self.arg_TQ[i, cols]
            out["per_property"] = {names[q]: [float(best_TQ[i, q]), int(arg_Q[q])] for q in np.flatnonzero(present_Q)}
        return out


def _columns(acts_PF, cols: np.ndarray) -> np.ndarray:
    """The given feature columns as a dense float32 (P, len(cols)) array (few columns: the labelled ones)."""
    if is_sparse(acts_PF):
        return acts_PF.tocsc()[:, cols].toarray().astype(np.float32)
    return np.asarray(acts_PF[:, cols], dtype=np.float32) if len(cols) else np.zeros((acts_PF.shape[0], 0), np.float32)


def board_counts(pred_PQ: np.ndarray, true_PQ: np.ndarray, classes_per_square: int | None) -> dict:
    """Karvonen's per-class and per-square precision / recall / F1 of a predicted board."""
    tp_PQ, fp_PQ = pred_PQ & true_PQ, pred_PQ & ~true_PQ
    tp, fp = float(np.count_nonzero(tp_PQ)), float(np.count_nonzero(fp_PQ))
    fn = float(np.count_nonzero(true_PQ)) - tp
    p = tp / (tp + fp + EPS)
    r = tp / (tp + fn + EPS)
    out = {"f1": 2 * p * r / (p + r + EPS), "precision": p, "recall": r, "tp": tp, "fp": fp, "fn": fn}
    if classes_per_square:
        P = pred_PQ.shape[0]
        tp_PS = np.count_nonzero(tp_PQ.reshape(P, -1, classes_per_square), axis=-1)
        fp_PS = np.count_nonzero(fp_PQ.reshape(P, -1, classes_per_square), axis=-1)
        adj = tp - float(np.count_nonzero((tp_PS == 1) & (fp_PS == 1)))  # exactly one TP and exactly one FP
        ps = adj / (adj + fp + EPS)
        rs = adj / (adj + fn + EPS)
        out.update({"f1_square": 2 * ps * rs / (ps + rs + EPS), "precision_square": ps, "recall_square": rs})
    return out


def _max_active_slot(level_PL: np.ndarray, has_TL: np.ndarray) -> np.ndarray:
    """Per (position, labelled feature): the highest slot i < level at which the feature has labels, else 0.

    level = the number of thresholds the activation exceeds (the feature fires at slots 0 ... level-1).
    """
    T, L = has_TL.shape
    # table_LV[l, v] = max{i < v : has_TL[i, l]} (0 if none), for v = 0 ... T
    idx_TL = np.where(has_TL, np.arange(T)[:, None], 0)
    table_LV = np.concatenate([np.zeros((L, 1), np.int64), np.maximum.accumulate(idx_TL, 0).T], 1)
    return table_LV[np.arange(L)[None, :], level_PL]


def reconstruct(train: TrainPass, acts_test_PF, labels_test_PQ, *, classes_per_square: int | None = None) -> dict:
    """Held-out board reconstruction from the train pass's labels (on its `label_cols`).

    Slots 0 ... T-2 predict with the labels of that threshold; the last slot is max-active.
    Returns the headline (`score`: per-class F1 at the best per-square slot among 0 ... T-2),
    `per_square_f1`, `max_active` (per-class) and `max_active_per_square`, the counts at the
    headline slot, `labelled_features`, `properties_labelled` and `per_threshold`.
    """
    true_PQ = np.asarray(labels_test_PQ, dtype=bool)
    T = len(train.thresholds)
    lab_T = train.labels
    used = np.unique(np.concatenate([m.nonzero()[0] for m in lab_T] + [np.zeros(0, np.int64)]))
    a_PL = _columns(acts_test_PF, used)  # only labelled features can vote
    L_TLQ = [m[used].astype(np.float32) for m in lab_T]
    max_L = train.max_F[used]
    level_PL = levels(a_PL, max_L, train.thresholds).astype(np.int64)
    slots = []
    for i in range(T - 1):  # threshold slots
        on_PL = level_PL > i
        slots.append((L_TLQ[i].T @ on_PL.T.astype(np.float32)).T > 0 if len(used) else np.zeros_like(true_PQ))
    # max-active: each firing feature votes with the labels of its highest labelled slot it fires at
    has_TL = np.stack([np.asarray(m.sum(1)).ravel() > 0 for m in L_TLQ]) if len(used) else np.zeros((T, 0), bool)
    slot_PL = _max_active_slot(level_PL, has_TL)
    votes_PQ = np.zeros(true_PQ.shape, np.float32)
    for i in range(T):
        m_PL = (level_PL > 0) & (slot_PL == i)
        if m_PL.any():
            votes_PQ += (L_TLQ[i].T @ m_PL.T.astype(np.float32)).T
    slots.append(votes_PQ > 0)
    counts = [board_counts(p, true_PQ, classes_per_square) for p in slots]
    key = "f1_square" if classes_per_square else "f1"
    best = int(np.argmax([c[key] for c in counts[:-1]]))
    c = counts[best]
    out = {"score": c["f1"], "threshold": train.thresholds[best], "precision": c["precision"], "recall": c["recall"],
           "max_active": counts[-1]["f1"], "labelled_features": int(lab_T[best].getnnz(1).astype(bool).sum()),
           "properties_labelled": int(lab_T[best].getnnz(0).astype(bool).sum()),
           "per_threshold": {str(t): {"per_class": counts[i]["f1"], **({"per_square": counts[i]["f1_square"]}
                                                                      if classes_per_square else {})}
                             for i, t in enumerate(train.thresholds[:-1])}}
    if classes_per_square:
        out.update({"per_square_f1": c["f1_square"], "max_active_per_square": counts[-1]["f1_square"]})
    out["per_threshold"]["max_active"] = {"per_class": counts[-1]["f1"],
                                          **({"per_square": counts[-1]["f1_square"]} if classes_per_square else {})}
    return out


def coverage(acts_PF, labels_PQ, names: list[str] | None = None, groups: dict[str, slice] | None = None,
             thresholds=THRESHOLDS, chunk: int | None = None) -> dict:
    """Mean over all properties of the best single feature's F1, maximised over thresholds.

    Returns a JSON-able dict: score, threshold, per_threshold, properties, present, alive,
    dead; `groups` (each group's own coverage) when given; `per_property` {name: [f1, feature]}
    for present properties when names are given.
    """
    tp = TrainPass(acts_PF, labels_PQ, thresholds=thresholds, chunk=chunk)
    out = tp.coverage(names=names)
    if groups:
        out["groups"] = {g: tp.coverage(s)["score"] for g, s in groups.items()}
    return out


def reconstruction(acts_train_PF, labels_train_PQ, acts_test_PF, labels_test_PQ, *, thresholds=THRESHOLDS,
                   classes_per_square: int | None = None, min_precision: float = 0.95, min_tp: int = 10,
                   chunk: int | None = None) -> dict:
    """Label features on the train set, reconstruct the held-out labels (see `reconstruct`)."""
    tp = TrainPass(acts_train_PF, labels_train_PQ, thresholds=thresholds, min_precision=min_precision,
                   min_tp=min_tp, chunk=chunk)
    return reconstruct(tp, acts_test_PF, labels_test_PQ, classes_per_square=classes_per_square)
