"""Board-state-property metrics (Karvonen et al.; as used by MoE-X): coverage and reconstruction.

Shape key: P positions, F features, Q properties.

- A feature fires when its activation > t x (its absolute max over the
  train-side sample), t in {0, 0.1, ..., 1}. F1 uses eps = 1e-8.
- Coverage: per threshold, the best single feature's F1 for each property,
  averaged over *all* Q properties (absent ones count 0); the max over t.
- Reconstruction: per threshold, a feature is labelled with every property it
  predicts with precision >= 0.95 (inclusive) and >= 10 true positives on the
  train set; on held-out positions each property is predicted as the OR of its
  labelled firing features; F1 of counts micro-averaged over positions x
  properties; the threshold with the best F1 is reported.
All (feature, property) counts at a threshold are one float32 matrix product of
boolean matrices, taken over chunks of features to bound memory.
"""

from __future__ import annotations

import numpy as np

THRESHOLDS = tuple(round(0.1 * i, 1) for i in range(11))
EPS = 1e-8
CHUNK = 2048  # features per matmul: P x CHUNK float32 copies stay small


def feature_max(acts_PF: np.ndarray) -> np.ndarray:
    """max_F: absolute max of each feature over the sample (the firing scale)."""
    return np.abs(acts_PF).max(0) if len(acts_PF) else np.zeros(acts_PF.shape[1], dtype=np.float32)


def alive_dead(acts_PF: np.ndarray, chunk: int = CHUNK) -> tuple[int, int]:
    """(alive, dead) feature counts; dead = never > 0 on the sample."""
    alive = sum(int((acts_PF[:, s : s + chunk] > 0).any(0).sum()) for s in range(0, acts_PF.shape[1], chunk))
    return alive, acts_PF.shape[1] - alive


def fires(acts_PF: np.ndarray, max_F: np.ndarray, t: float) -> np.ndarray:
    return acts_PF > (t * max_F)[None, :]


def pair_counts(fires_PF: np.ndarray, labels_PQ: np.ndarray):
    """(tp_FQ, predicted-positive count per feature, actual-positive count per property), float32."""
    tp_FQ = fires_PF.T.astype(np.float32) @ labels_PQ.astype(np.float32)
    return tp_FQ, fires_PF.sum(0).astype(np.float32), labels_PQ.sum(0).astype(np.float32)


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


def label_features(acts_PF, labels_PQ, max_F, t, *, min_precision=0.95, min_tp=10) -> np.ndarray:
    """L_FQ: feature f is labelled with property q at threshold t."""
    tp, pred, _ = pair_counts(fires(acts_PF, max_F, t), labels_PQ)
    return is_label(tp, pred, min_precision=min_precision, min_tp=min_tp)


def _best_per_property(acts_PF, labels_PQ, max_F, t, chunk):
    """(best F1, best feature) per property at threshold t, chunked over features."""
    Q = labels_PQ.shape[1]
    best_Q, arg_Q = np.zeros(Q, np.float32), np.full(Q, -1, np.int64)
    L_PQ = labels_PQ.astype(np.float32)
    actual_Q = L_PQ.sum(0)
    for s in range(0, acts_PF.shape[1], chunk):
        f_Pf = fires(acts_PF[:, s : s + chunk], max_F[s : s + chunk], t)
        f1_fQ = f1_matrix(f_Pf.T.astype(np.float32) @ L_PQ, f_Pf.sum(0).astype(np.float32), actual_Q)[0]
        top_Q = f1_fQ.argmax(0)
        val_Q = f1_fQ[top_Q, np.arange(Q)]
        better = val_Q > best_Q
        best_Q[better], arg_Q[better] = val_Q[better], s + top_Q[better]
    return best_Q, arg_Q


def coverage(acts_PF: np.ndarray, labels_PQ: np.ndarray, names: list[str] | None = None,
             groups: dict[str, slice] | None = None, thresholds=THRESHOLDS, chunk: int = CHUNK) -> dict:
    """Mean over all properties of the best single feature's F1, maximised over thresholds.

    Returns a JSON-able dict: score, threshold, per_threshold, properties,
    present, alive, dead; `groups` (mean best F1 per property group at the best
    threshold) when given; `per_property` {name: [f1, feature]} for present
    properties when names are given.
    """
    acts_PF, labels_PQ = np.asarray(acts_PF), np.asarray(labels_PQ, dtype=bool)
    max_F = feature_max(acts_PF)
    per_t, best = [], None
    for t in thresholds:
        best_Q, arg_Q = _best_per_property(acts_PF, labels_PQ, max_F, t, chunk)
        score = float(best_Q.mean()) if best_Q.size else 0.0
        per_t.append(score)
        if best is None or score > best[1]:
            best = (t, score, best_Q, arg_Q)
    t, score, best_Q, arg_Q = best
    alive, dead = alive_dead(acts_PF, chunk)
    present_Q = labels_PQ.any(0)
    out = {"score": score, "threshold": t, "per_threshold": dict(zip(map(str, thresholds), per_t)),
           "properties": int(labels_PQ.shape[1]), "present": int(present_Q.sum()), "alive": alive, "dead": dead}
    if groups:
        out["groups"] = {g: float(best_Q[s].mean()) if best_Q[s].size else 0.0 for g, s in groups.items()}
    if names is not None:
        out["per_property"] = {names[q]: [float(best_Q[q]), int(arg_Q[q])] for q in np.flatnonzero(present_Q)}
    return out


def _reconstruct_at(acts_tr, labels_tr, acts_te, max_F, t, chunk, min_precision, min_tp):
    """(pred_PQ on the held-out positions, labelled-feature count, labelled property mask) at threshold t."""
    L_tr = labels_tr.astype(np.float32)
    votes_PQ = np.zeros((acts_te.shape[0], labels_tr.shape[1]), np.float32)
    n_labelled, covered_Q = 0, np.zeros(labels_tr.shape[1], bool)
    for s in range(0, acts_tr.shape[1], chunk):
        f_tr = fires(acts_tr[:, s : s + chunk], max_F[s : s + chunk], t)
        L_fQ = is_label(f_tr.T.astype(np.float32) @ L_tr, f_tr.sum(0).astype(np.float32),
                        min_precision=min_precision, min_tp=min_tp)
        keep = np.flatnonzero(L_fQ.any(1))  # only labelled features can vote
        if len(keep):
            f_te = fires(acts_te[:, s : s + chunk][:, keep], max_F[s : s + chunk][keep], t)
            votes_PQ += f_te.astype(np.float32) @ L_fQ[keep].astype(np.float32)
        n_labelled += len(keep)
        covered_Q |= L_fQ.any(0)
    return votes_PQ > 0, n_labelled, covered_Q


def micro_f1(pred_PQ: np.ndarray, true_PQ: np.ndarray) -> dict:
    """Precision, recall, F1 of counts summed over all positions x properties."""
    tp = float((pred_PQ & true_PQ).sum())
    p = tp / (float(pred_PQ.sum()) + EPS)
    r = tp / (float(true_PQ.sum()) + EPS)
    return {"f1": 2 * p * r / (p + r + EPS), "precision": p, "recall": r}


def reconstruction(acts_train_PF, labels_train_PQ, acts_test_PF, labels_test_PQ, names=None,
                   groups: dict[str, slice] | None = None, thresholds=THRESHOLDS, *, min_precision: float = 0.95,
                   min_tp: int = 10, chunk: int = CHUNK) -> dict:
    """Predict held-out properties from features labelled on the train set; micro F1 at the best threshold.

    Returns a JSON-able dict: score (F1), precision, recall, threshold,
    labelled_features, properties_labelled, per_threshold; `groups` (micro F1
    per group at the best threshold) when given.
    """
    a_tr, a_te = np.asarray(acts_train_PF), np.asarray(acts_test_PF)
    l_tr, l_te = np.asarray(labels_train_PQ, dtype=bool), np.asarray(labels_test_PQ, dtype=bool)
    max_F = feature_max(a_tr)  # firing scale comes from the train-side sample
    per_t, best = [], None
    for t in thresholds:
        pred_PQ, n_lab, covered_Q = _reconstruct_at(a_tr, l_tr, a_te, max_F, t, chunk, min_precision, min_tp)
        m = micro_f1(pred_PQ, l_te)
        per_t.append(m["f1"])
        if best is None or m["f1"] > best["score"]:
            best = {"score": m["f1"], "precision": m["precision"], "recall": m["recall"], "threshold": t,
                    "labelled_features": n_lab, "properties_labelled": int(covered_Q.sum())}
            if groups:
                best["groups"] = {g: micro_f1(pred_PQ[:, s], l_te[:, s])["f1"] for g, s in groups.items()}
    best["per_threshold"] = dict(zip(map(str, thresholds), per_t))
    return best
