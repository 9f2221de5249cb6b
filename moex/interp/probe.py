"""Linear probes: does a model represent the board at all?

Shape key: P positions, D activation dim, S heads (squares), C classes per head.

A probe is multinomial logistic regression fit full-batch with L-BFGS on
standardised activations (mean/std from the training positions). The chess
board probe has S = 64 heads of C = 13 classes (empty + `PNBRQKpnbrqk`),
trained on the labelling games and scored on held-out games, with the
per-square majority class (from the training positions) as the baseline.
Without probe accuracy well above that baseline, no single feature can score
high on the board-state metrics.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from moex.interp.board import INITIAL_SC

N_CLASSES = 13  # 0 = empty, 1 + c for board.CLASSES[c]


@dataclass
class SoftmaxProbe:
    """Standardisation and weights of a fitted probe: logits = ((x - mean) / std) @ w + b."""

    mean_D: torch.Tensor
    std_D: torch.Tensor
    w_DK: torch.Tensor  # K = C * S, class-major: column c * S + s
    b_K: torch.Tensor
    heads: int
    classes: int

    def logits(self, x_PD) -> torch.Tensor:
        x = (torch.as_tensor(np.asarray(x_PD), dtype=torch.float32) - self.mean_D) / self.std_D
        return (x @ self.w_DK + self.b_K).view(len(x), self.classes, self.heads)

    def predict(self, x_PD) -> np.ndarray:
        """(P, S) predicted class per head."""
        return self.logits(x_PD).argmax(1).numpy()


def fit_softmax(x_PD, y_PS, classes: int, *, l2: float = 1e-4, max_iter: int = 100) -> SoftmaxProbe:
    """Multinomial logistic regression per head (`y_PS` int in [0, classes)), L-BFGS on the mean cross-entropy.

    `l2` weighs the squared Frobenius norm of the weights (not the bias); a 1-D `y_P` is one head.
    """
    x = torch.as_tensor(np.asarray(x_PD), dtype=torch.float32)
    y = torch.as_tensor(np.asarray(y_PS), dtype=torch.long)
    y = y[:, None] if y.ndim == 1 else y
    P, D = x.shape
    S = y.shape[1]
    mean_D = x.mean(0)
    std_D = x.std(0, unbiased=False).clamp_min(1e-6)  # constant features stay 0 after centring
    x = (x - mean_D) / std_D
    w = torch.zeros(D, classes * S, requires_grad=True)
    # start from the training frequencies: the probe begins at the majority-class solution
    freq_CS = torch.zeros(S, classes).scatter_add_(1, y.T, torch.ones(S, P)).T / P
    b = freq_CS.clamp_min(1e-6).log().reshape(-1).clone().requires_grad_(True)
    opt = torch.optim.LBFGS([w, b], lr=1.0, max_iter=max_iter, history_size=20, line_search_fn="strong_wolfe",
                            tolerance_grad=1e-6, tolerance_change=1e-9)

    def closure():
        opt.zero_grad()
        # (P, C, S): the class reduction runs over a strided dim with S contiguous (fast on CPU)
        loss = F.cross_entropy((x @ w + b).view(P, classes, S), y) + l2 * (w * w).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    return SoftmaxProbe(mean_D, std_D, w.detach(), b.detach(), S, classes)


def square_classes(pieces_PQ: np.ndarray) -> np.ndarray:
    """(P, 64) class per square from the (P, 64*12) `piece` property block: 0 empty, 1 + piece class."""
    p_PSC = np.asarray(pieces_PQ, dtype=bool).reshape(len(pieces_PQ), 64, 12)
    return np.where(p_PSC.any(-1), p_PSC.argmax(-1) + 1, 0)


def majority(y_train_PS: np.ndarray, classes: int = N_CLASSES) -> np.ndarray:
    """(S,) the most frequent class of each head on the training positions (smallest id on ties)."""
    y = np.asarray(y_train_PS)
    counts_SC = np.stack([np.bincount(y[:, s], minlength=classes) for s in range(y.shape[1])])
    return counts_SC.argmax(1)


INITIAL_S = square_classes(INITIAL_SC.reshape(1, -1))[0]  # class of each square at the start


def board_probe(acts_train_PD, squares_train_PS, acts_test_PD, squares_test_PS, *, l2: float = 1e-4,
                max_iter: int = 100) -> dict:
    """Fit the 64 x 13 board probe on train positions; accuracy on held-out ones beside the majority baseline.

    `changed` restricts both to (position, square) pairs whose content differs from
    the starting position: the squares a model must track rather than remember.
    """
    y_tr, y_te = np.asarray(squares_train_PS), np.asarray(squares_test_PS)
    probe = fit_softmax(acts_train_PD, y_tr, N_CLASSES, l2=l2, max_iter=max_iter)
    pred_PS = probe.predict(acts_test_PD)
    base_PS = np.broadcast_to(majority(y_tr), y_te.shape)
    changed_PS = y_te != INITIAL_S[None, :]
    ok, base_ok = pred_PS == y_te, base_PS == y_te
    train_acc = float((probe.predict(acts_train_PD) == y_tr).mean())
    return {
        "accuracy": float(ok.mean()), "majority_baseline": float(base_ok.mean()),
        "accuracy_changed": float(ok[changed_PS].mean()) if changed_PS.any() else None,
        "majority_changed": float(base_ok[changed_PS].mean()) if changed_PS.any() else None,
        "train_accuracy": train_acc, "dim": int(np.asarray(acts_train_PD).shape[1]),
        "train_positions": int(len(y_tr)), "test_positions": int(len(y_te)),
    }
