"""Perplexity and routing statistics of a model on a token-block split."""

from __future__ import annotations

import math

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
