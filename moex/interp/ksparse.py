"""k-sparse probing (Gurnee et al. 2023, "Finding Neurons in a Haystack").

Shape key: P positions, F features, Q binary properties, K selected features.

For each property: rank every feature on the training positions by a cheap
statistic — the two-class F-statistic (default; scale-free) or the absolute
difference of class means (Gurnee's heuristic) — keep the top k, fit an
L2-regularised logistic regression on those k standardised features (batched
Newton's method, exact for k <= 16), and score F1 on held-out positions.
k = 1, 2, 4, 8, 16. Only properties with at least `min_count` positives and
negatives among the training positions are probed; group scores average F1
over those.

Feature matrices may be dense arrays or scipy.sparse matrices: ranking needs
only X^T Y and (X*X)^T Y products, and only the selected columns are ever
densified, so a 262k-feature sparse code never becomes dense.
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp
import torch

KS = (1, 2, 4, 8, 16)
EPS = 1e-8
RANKINGS = ("f_stat", "mean_diff")


def _sums(y_QP: sp.csr_matrix, x_PF) -> np.ndarray:
    """y^T-weighted column sums, dense (Q, F) float64: one sparse product, cost ~ nnz(y) * F."""
    out = y_QP @ x_PF
    return np.asarray(out.toarray() if sp.issparse(out) else out, dtype=np.float64)


def _square(x_PF):
    return x_PF.multiply(x_PF).tocsr() if sp.issparse(x_PF) else np.square(x_PF)


def rank_scores(x_PF, labels_PQ, method: str = "f_stat") -> np.ndarray:
    """(Q, F) ranking score of every feature for every property on these positions (higher = better).

    f_stat: one-way ANOVA F of the feature between the two classes (+inf for a
    perfect separator with zero within-class variance, 0 for a constant feature);
    mean_diff: |mean over positives - mean over negatives|.
    """
    if method not in RANKINGS:
        raise ValueError(f"unknown ranking {method!r}; valid: {', '.join(RANKINGS)}")
    y_QP = sp.csr_matrix(np.asarray(labels_PQ, dtype=np.float32).T)  # labels are sparse: products cost nnz * F
    P = y_QP.shape[1]
    ones = sp.csr_matrix(np.ones((1, P), np.float32))
    n1_Q = np.asarray(y_QP.sum(1), dtype=np.float64)  # (Q, 1)
    n0_Q = P - n1_Q
    s1_QF, s_F = _sums(y_QP, x_PF), _sums(ones, x_PF)  # sums over positives / over all
    m1 = s1_QF / np.maximum(n1_Q, 1)
    m0 = (s_F - s1_QF) / np.maximum(n0_Q, 1)
    if method == "mean_diff":
        return np.abs(m1 - m0)
    ss_F = _sums(ones, _square(x_PF))
    m = s_F / P
    between = n1_Q * (m1 - m) ** 2 + n0_Q * (m0 - m) ** 2
    within = ss_F - n1_Q * m1**2 - n0_Q * m0**2  # within-class sum of squares
    tiny = 1e-9 * np.maximum(ss_F, 1e-30)  # float rounding of a zero within-class spread
    f = between / np.maximum(within, tiny) * (P - 2)
    return np.where(within > tiny, f, np.where(between > tiny, np.inf, 0.0))


def top_k(scores_QF: np.ndarray, k: int) -> np.ndarray:
    """(Q, k) feature indices in decreasing score order (ties: lower index first)."""
    k = min(k, scores_QF.shape[1])
    return np.argsort(-scores_QF, axis=1, kind="stable")[:, :k]


def _columns(x_PF, cols: np.ndarray) -> np.ndarray:
    """Dense float32 (P, len(cols)) of the given columns only."""
    if sp.issparse(x_PF):
        return np.asarray(x_PF[:, cols].todense(), dtype=np.float32)  # CSC: column slicing is cheap
    return np.asarray(np.asarray(x_PF)[:, cols], dtype=np.float32)


def fit_logistic(x_QKP: torch.Tensor, y_QP: torch.Tensor, *, l2: float = 1e-3, iters: int = 30,
                 w0: torch.Tensor | None = None, weight_QP: torch.Tensor | None = None,
                 tol: float = 1e-5) -> torch.Tensor:
    """Batched L2 logistic regression by Newton's method: (Q, K+1) weights, bias last.

    Minimises the (weighted) mean log-loss + l2/2 * ||w||^2 (bias unpenalised),
    independently per q. `x_QKP` is positions-last (fast products on CPU); `w0`
    warm-starts (e.g. from the k/2 solution padded with zeros); stops when no
    Newton step moves a weight by more than `tol`.
    """
    Q, K, P = x_QKP.shape
    xb = torch.cat([x_QKP.float(), x_QKP.new_ones(Q, 1, P, dtype=torch.float32)], 1)  # (Q, K+1, P)
    y = y_QP.float()
    c = torch.ones(Q, P) if weight_QP is None else weight_QP.float()
    c = c / c.sum(1, keepdim=True)  # weights of the mean
    if w0 is None:
        pos = (c * y).sum(1).clamp(1e-6, 1 - 1e-6).double()
        w = torch.zeros(Q, K + 1, dtype=torch.float64)
        w[:, -1] = torch.log(pos / (1 - pos))
    else:
        w = w0.double().clone()
    reg = torch.full((K + 1,), l2, dtype=torch.float64)
    reg[-1] = 0.0
    for _ in range(iters):
        p = torch.sigmoid(torch.bmm(w.float().unsqueeze(1), xb).squeeze(1))  # (Q, P)
        g = torch.bmm(xb, (c * (p - y)).unsqueeze(-1)).squeeze(-1).double() + reg * w
        h = torch.bmm(xb * (c * p * (1 - p)).unsqueeze(1), xb.transpose(1, 2)).double() + torch.diag(reg + 1e-9)
        step = torch.linalg.solve(h, g.unsqueeze(-1)).squeeze(-1)
        w = w - step
        if step.abs().max() < tol:
            break
    return w


def _f1(pred_QP: torch.Tensor, y_QP: torch.Tensor) -> np.ndarray:
    tp = (pred_QP & y_QP).sum(1).double()
    p = tp / (pred_QP.sum(1).double() + EPS)
    r = tp / (y_QP.sum(1).double() + EPS)
    return (2 * p * r / (p + r + EPS)).numpy()


def _chunk_for(n_features: int, budget: int = 1 << 24) -> int:
    """Properties per chunk so that a (Q, F) score matrix stays within `budget` entries."""
    return max(1, budget // max(n_features, 1))


def fit_sample(y_QP: np.ndarray, max_fit: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Case-control sample of at most `max_fit` training positions per property, with weights.

    Keeps up to half the budget of positives (more when negatives are fewer) and
    fills the rest with negatives, both drawn without replacement; each kept
    position weighs (class count / kept count), so the weighted mean log-loss is an
    unbiased estimate of the full one. Returns (positions_QM, weights_QM).
    """
    Q, P = y_QP.shape
    M = min(P, max_fit)
    if M == P:
        return np.broadcast_to(np.arange(P), (Q, P)), np.ones((Q, P), np.float32)
    rng = np.random.default_rng(seed)
    pos_QM, wt_QM = np.empty((Q, M), np.int64), np.empty((Q, M), np.float32)
    for q in range(Q):
        ones, zeros = np.flatnonzero(y_QP[q]), np.flatnonzero(~y_QP[q])
        k1 = min(len(ones), max(M // 2, M - len(zeros)))
        pos_QM[q] = np.concatenate([rng.choice(ones, k1, replace=False), rng.choice(zeros, M - k1, replace=False)])
        wt_QM[q, :k1], wt_QM[q, k1:] = len(ones) / max(k1, 1), len(zeros) / max(M - k1, 1)
    return pos_QM, wt_QM


def probe_properties(x_train_PF, labels_train_PQ, x_test_PF, labels_test_PQ, *, ks=KS, rank: str = "f_stat",
                     min_count: int = 10, l2: float = 1e-3, max_fit: int = 4096, tol: float = 1e-3) -> dict:
    """Held-out F1 of the best k-feature probe for each probe-able property and each k.

    Features are ranked on all training positions; each classifier is fit on a
    weighted case-control sample of at most `max_fit` of them (`fit_sample`; all of
    them, unweighted, when there are fewer), Newton steps until no weight moves by
    more than `tol`.
    Returns {"properties": (Q',) column indices probed, "f1": {k: (Q',) held-out F1},
    "features": (Q', max k) ranked feature indices}.
    """
    y_tr = np.asarray(labels_train_PQ, dtype=bool)
    y_te = np.asarray(labels_test_PQ, dtype=bool)
    ks = sorted(ks)
    if sp.issparse(x_train_PF):
        x_train_PF, x_test_PF = sp.csc_matrix(x_train_PF), sp.csc_matrix(x_test_PF)
    n1 = y_tr.sum(0)
    props = np.flatnonzero((n1 >= min_count) & (len(y_tr) - n1 >= min_count))
    f1 = {k: np.zeros(len(props)) for k in ks}
    feats = np.zeros((len(props), min(ks[-1], x_train_PF.shape[1])), np.int64)
    chunk = min(_chunk_for(x_train_PF.shape[1]), 64)  # 64 properties bound the (Q, K, P) copies
    for s in range(0, len(props), chunk):
        q = props[s : s + chunk]
        top_QK = top_k(rank_scores(x_train_PF, y_tr[:, q], rank), ks[-1])
        feats[s : s + len(q)] = top_QK
        cols, inv = np.unique(top_QK, return_inverse=True)  # densify only the selected columns
        inv = inv.reshape(top_QK.shape)
        a_tr, a_te = _columns(x_train_PF, cols), _columns(x_test_PF, cols)
        mu, sd = a_tr.mean(0), a_tr.std(0)
        sd = np.where(sd > 0, sd, 1.0)
        a_tr = torch.from_numpy(np.ascontiguousarray(((a_tr - mu) / sd).T))  # (U, P): positions last
        a_te = torch.from_numpy(np.ascontiguousarray(((a_te - mu) / sd).T))
        yq_te = torch.from_numpy(y_te[:, q].T.copy())
        pos_QM, wt_QM = fit_sample(y_tr[:, q].T, max_fit, seed=s)
        yq_tr = torch.from_numpy(np.take_along_axis(y_tr[:, q].T, pos_QM, 1))
        pos_QM, wt_QM = torch.from_numpy(np.ascontiguousarray(pos_QM)), torch.from_numpy(wt_QM)
        # the ranked features are nested (top-k is a prefix of top-16): gather once, slice per k
        x_tr_QKM = a_tr[torch.from_numpy(inv)[:, :, None], pos_QM[:, None, :]]
        x_te_QKP = a_te[torch.from_numpy(inv)]
        w = None
        for k in ks:
            kk = min(k, top_QK.shape[1])
            if w is not None:  # warm start: the top-k features extend the previous top-k
                w = torch.cat([w[:, :-1], w.new_zeros(len(q), kk - (w.shape[1] - 1)), w[:, -1:]], 1)
            w = fit_logistic(x_tr_QKM[:, :kk], yq_tr, l2=l2, w0=w, weight_QP=wt_QM, tol=tol)
            logit_QP = torch.bmm(w[:, :-1].float().unsqueeze(1), x_te_QKP[:, :kk]).squeeze(1) + w[:, -1:].float()
            f1[k][s : s + len(q)] = _f1(logit_QP > 0, yq_te)
    return {"properties": props, "f1": f1, "features": feats}


def summarise(res: dict, groups: dict[str, slice]) -> dict:
    """JSON-able: per group, mean held-out F1 per k over probed properties, and how many were probed."""
    props = res["properties"]
    out = {}
    for g, sl in groups.items():
        sel = (props >= sl.start) & (props < sl.stop)
        out[g] = {"probed": int(sel.sum()), "properties": sl.stop - sl.start,
                  "f1": {str(k): float(v[sel].mean()) if sel.any() else None for k, v in res["f1"].items()}}
    return out
