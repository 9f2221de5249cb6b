"""Headline formulas against hand computations: balance metrics, the LR schedule, RoPE."""

import math

import pytest
import torch

from moex.config import OptimConfig
from moex.eval.balance import balance_metrics
from moex.models.attention import apply_rope, rope_cache
from moex.training.schedule import lr_at


@pytest.mark.parametrize("load, cv, maxvio, entropy", [
    ([2, 2, 2, 2], 0.0, 0.0, 1.0),  # uniform
    ([4, 0, 0, 0], math.sqrt(3), 3.0, 0.0),  # mean 1; population std sqrt((9 + 1 + 1 + 1) / 4)
    ([3, 1], 0.5, 0.5, -(0.75 * math.log(0.75) + 0.25 * math.log(0.25)) / math.log(2)),
    ([6, 3, 0], math.sqrt(6) / 3, 1.0, -(2 / 3 * math.log(2 / 3) + 1 / 3 * math.log(1 / 3)) / math.log(3)),
])
def test_balance_metrics_hand_worked(load, cv, maxvio, entropy):
    m = balance_metrics(torch.tensor(load))
    assert m["cv"] == pytest.approx(cv)
    assert m["maxvio"] == pytest.approx(maxvio)
    assert m["load_entropy"] == pytest.approx(entropy)


def test_balance_metrics_no_tokens():
    assert balance_metrics(torch.zeros(4)) == {"cv": 0.0, "maxvio": 0.0, "load_entropy": 0.0}


def test_lr_schedule_boundaries():
    cfg = OptimConfig(lr=1.0, min_lr=0.1, warmup_steps=10)
    assert lr_at(0, cfg, 110) == pytest.approx(0.1)  # (0 + 1) / 10 of lr
    assert lr_at(4, cfg, 110) == pytest.approx(0.5)
    assert lr_at(9, cfg, 110) == pytest.approx(1.0)  # warmup ends at the peak
    assert lr_at(10, cfg, 110) == pytest.approx(1.0)  # cosine starts at the peak
    assert lr_at(60, cfg, 110) == pytest.approx(0.1 + 0.5 * 0.9)  # half way: cos(pi/2) = 0
    assert lr_at(35, cfg, 110) == pytest.approx(0.1 + 0.5 * (1 + math.cos(math.pi / 4)) * 0.9)
    assert lr_at(110, cfg, 110) == pytest.approx(0.1)  # the end is min_lr ...
    assert lr_at(500, cfg, 110) == pytest.approx(0.1)  # ... and stays there past max_steps


def test_lr_schedule_constant_after_warmup():
    cfg = OptimConfig(lr=2.0, min_lr=0.1, warmup_steps=4, schedule="constant")
    assert [lr_at(s, cfg, 100) for s in (0, 3, 4, 99)] == pytest.approx([0.5, 2.0, 2.0, 2.0])


def _rope(x_TC: torch.Tensor, positions: list[int], base: float = 10000.0) -> torch.Tensor:
    cos, sin = rope_cache(max(positions) + 1, x_TC.shape[-1], base)
    return apply_rope(x_TC[None, None], cos[positions], sin[positions])[0, 0]


def test_rope_rotates_each_pair_by_position_times_frequency():
    C, base = 8, 10000.0
    x = torch.randn(1, C, dtype=torch.float64).float()
    p = 5
    out = _rope(x, [p])[0]
    for i in range(C // 2):  # pair (2i, 2i+1) rotated by p * base^(-2i/C)
        a = p * base ** (-2 * i / C)
        x1, x2 = x[0, 2 * i].item(), x[0, 2 * i + 1].item()
        assert out[2 * i].item() == pytest.approx(x1 * math.cos(a) - x2 * math.sin(a), abs=1e-5)
        assert out[2 * i + 1].item() == pytest.approx(x1 * math.sin(a) + x2 * math.cos(a), abs=1e-5)


def test_rope_identity_at_zero_and_norm_preserving():
    x = torch.randn(6, 16)
    assert torch.allclose(_rope(x[:1], [0]), x[:1])
    out = _rope(x, list(range(6)))
    assert torch.allclose(out.norm(dim=-1), x.norm(dim=-1), atol=1e-5)


def test_rope_scores_depend_only_on_relative_position():
    torch.manual_seed(0)
    q, k = torch.randn(1, 32), torch.randn(1, 32)
    score = lambda m, n: (_rope(q, [m]) @ _rope(k, [n]).T).item()  # noqa: E731
    assert score(7, 3) == pytest.approx(score(4, 0), abs=1e-4)
    assert score(30, 12) == pytest.approx(score(18, 0), abs=1e-4)
    assert score(5, 5) == pytest.approx((q @ k.T).item(), abs=1e-4)
    assert abs(score(7, 3) - score(3, 7)) > 1e-3  # but not symmetric in m - n
