"""Autoregressive sampling with a KV cache: temperature, top-k, top-p (nucleus), seeded.

Shape key: B batch, T time, V vocab.

Each step feeds only the new token (its keys/values join the cache), so a step
costs one token's forward instead of the whole prefix's. When the sequence
outgrows the context (`block_size`), the cache is rebuilt from the last half
context of tokens and decoding continues from there.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor


def filter_logits(logits_BV: Tensor, *, top_k: int = 0, top_p: float = 1.0) -> Tensor:
    """Logits with everything outside the top-k / the top-p nucleus set to -inf.

    top-p keeps the smallest set of most likely tokens whose probability mass
    reaches `top_p` (always at least the most likely token).
    """
    if top_k and top_k < logits_BV.size(-1):
        kth_B1 = logits_BV.topk(top_k, dim=-1).values[:, -1:]
        logits_BV = logits_BV.masked_fill(logits_BV < kth_B1, float("-inf"))
    if top_p < 1.0:
        sorted_BV, order_BV = logits_BV.sort(dim=-1, descending=True)
        cum_BV = sorted_BV.softmax(-1).cumsum(-1)
        drop_sorted_BV = cum_BV - sorted_BV.softmax(-1) >= top_p  # mass before this token already enough
        drop_BV = drop_sorted_BV.scatter(-1, order_BV, drop_sorted_BV)
        logits_BV = logits_BV.masked_fill(drop_BV, float("-inf"))
    return logits_BV


def sample_next(logits_BV: Tensor, *, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                generator: torch.Generator | None = None) -> Tensor:
    """Next token ids (B,) from last-position logits; temperature 0 = greedy (argmax)."""
    logits_BV = logits_BV.float()
    if temperature <= 0:
        return logits_BV.argmax(-1)
    logits_BV = filter_logits(logits_BV / temperature, top_k=top_k, top_p=top_p)
    probs_BV = logits_BV.softmax(-1)
    return torch.multinomial(probs_BV, 1, generator=generator).squeeze(-1)


@torch.no_grad()
def generate(model, idx_BT: Tensor, max_new_tokens: int, *, temperature: float = 1.0, top_k: int = 0,
             top_p: float = 1.0, generator: torch.Generator | None = None, use_cache: bool = True,
             stop: Callable[[Tensor], bool] | None = None) -> Tensor:
    """`idx_BT` followed by up to `max_new_tokens` sampled tokens (B, T + n).

    `stop(idx_BT)` is asked after every step and ends generation early when true.
    With `use_cache=False` every step re-runs the whole prefix (cropped to the
    last block_size tokens): within the context, the reference the cached path
    is tested against. The model must be in eval mode
    (expert-choice routers then route causally, BatchNorm uses running stats).
    """
    if model.training:
        raise ValueError("generate: put the model in eval mode first (model.eval())")
    if idx_BT.size(1) == 0:
        raise ValueError("generate: the prompt must hold at least one token")
    ctx = model.cfg.block_size
    cache, feed_BT = model.new_cache(), idx_BT[:, -ctx:]
    for _ in range(max_new_tokens):
        if use_cache:
            if cache.pos + feed_BT.size(1) > ctx:  # context full: rebuild from the last half context
                cache, feed_BT = model.new_cache(), idx_BT[:, -max(1, ctx // 2) :]
            logits_BTV = model(feed_BT, cache=cache).logits
        else:
            logits_BTV = model(idx_BT[:, -ctx:]).logits
        next_B = sample_next(logits_BTV[:, -1], temperature=temperature, top_k=top_k, top_p=top_p,
                             generator=generator)
        idx_BT = torch.cat((idx_BT, next_B[:, None]), dim=1)
        feed_BT = next_B[:, None]
        if stop is not None and stop(idx_BT):
            break
    return idx_BT
