"""Perplexity and routing statistics: over a split's token blocks, or sliding windows over a token stream."""

from __future__ import annotations

import math

import numpy as np
import torch

from moex.eval.balance import StatsAccumulator


@torch.no_grad()
def evaluate(model, blocks, *, batch_size: int, max_batches: int = 0, device="cpu", progress: bool = False) -> dict:
    """Mean token cross-entropy, perplexity and per-layer routing stats.

    `max_batches=0` evaluates the whole split; `total_nll`/`tokens` let a
    caller convert to word-level perplexity (exp(total_nll / words)).
    """
    was_training = model.training
    model.eval()
    acc = StatsAccumulator()
    nll, tokens = 0.0, 0
    batches = blocks.iter_eval(batch_size, max_batches)
    if progress:
        from tqdm import tqdm

        batches = tqdm(batches, desc="eval", leave=False)
    for x, y in batches:
        out = model(x.to(device), y.to(device))
        n = y.numel()
        nll += float(out.ce_loss) * n
        tokens += n
        acc.add(out.layer_stats)
    model.train(was_training)
    loss = nll / max(1, tokens)
    return {"loss": loss, "ppl": math.exp(min(loss, 50.0)), "total_nll": nll, "tokens": tokens, "layers": acc.summary()}


def window_starts(n_tokens: int, block_size: int, stride: int) -> list[int]:
    """Starts of the (block_size + 1)-token windows a sliding evaluation runs.

    Windows start at 0, S, 2S, ... while they fit; with S <= block_size a last
    window ends exactly at the stream's end, so every token but the first is
    scored. S = block_size + 1 gives today's non-overlapping blocks (the first
    token of each block is context only; a tail that fills no block is skipped).
    """
    W = block_size + 1
    if not 1 <= stride <= W:
        raise ValueError(f"stride {stride} must lie in [1, block_size + 1 = {W}]")
    if n_tokens < W:
        raise ValueError(f"{n_tokens} tokens are fewer than one window of block_size + 1 = {W}")
    starts = list(range(0, n_tokens - W + 1, stride))
    if stride < W and starts[-1] + W < n_tokens:
        starts.append(n_tokens - W)
    return starts


@torch.no_grad()
def sliding_window_nll(model, tokens_N, *, block_size: int, stride: int, batch_size: int, device="cpu",
                       progress: bool = False) -> dict:
    """Total NLL over a flat token stream, each window scoring only tokens no earlier window scored.

    A window is block_size + 1 tokens (the model's inputs plus the last target).
    A token scored in a window that starts at s has the s..t-1 tokens before it as
    context: with stride S every scored token after the first window sees at least
    block_size + 1 - S tokens (stride 1: a full context for every token).
    """
    was_training = model.training
    model.eval()
    acc = StatsAccumulator()
    W = block_size + 1
    tokens_N = torch.as_tensor(np.asarray(tokens_N, dtype=np.int64))
    starts = window_starts(len(tokens_N), block_size, stride)
    # first new target (as a position in the window's target row 0..T-1) of every window
    first_new, last = [], 0  # last = highest token position scored so far
    for s in starts:
        first_new.append(max(last, s) - s)  # target j predicts token s + 1 + j; new when s + 1 + j > last
        last = s + W - 1
    nll, scored = 0.0, 0
    batches = range(0, len(starts), batch_size)
    if progress:
        from tqdm import tqdm

        batches = tqdm(batches, desc="eval (sliding)", leave=False)
    for b in batches:
        idx = starts[b : b + batch_size]
        win_BW = torch.stack([tokens_N[s : s + W] for s in idx]).to(device)
        out = model(win_BW[:, :-1])
        logp_BTV = out.logits.float().log_softmax(-1)
        nll_BT = -logp_BTV.gather(-1, win_BW[:, 1:, None]).squeeze(-1)
        keep_BT = torch.arange(block_size, device=device)[None, :] >= torch.tensor(first_new[b : b + batch_size],
                                                                                   device=device)[:, None]
        nll += float(nll_BT[keep_BT].double().sum())
        scored += int(keep_BT.sum())
        acc.add(out.layer_stats)
    model.train(was_training)
    loss = nll / max(1, scored)
    return {"loss": loss, "ppl": math.exp(min(loss, 50.0)), "total_nll": nll, "tokens": scored,
            "stream_tokens": len(tokens_N), "stride": stride, "windows": len(starts), "layers": acc.summary()}
