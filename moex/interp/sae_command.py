"""`moex train-sae CKPT --source L2.mlp.post [--k 32 --latents 2048] --out SAE.pt`.

Trains a TopK (or ReLU+L1) sparse autoencoder on a dense model's MLP hidden
units, collected from the run's own training split, and reports L0, explained
variance, dead latents and the fraction of the LM loss recovered when the SAE's
reconstruction is spliced back into the model (vs zero-ablating the MLP).
Its latents then serve as a feature source: `moex interpret CKPT --sae SAE.pt`.
"""

from __future__ import annotations

import argparse
import json
import types
from pathlib import Path

import torch


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("path", help="run or checkpoint directory of a dense model")
    p.add_argument("--source", required=True, help="feature source to encode, e.g. L2.mlp.post")
    p.add_argument("--kind", choices=["topk", "relu"], default="topk")
    p.add_argument("--latents", type=int, default=2048)
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--l1", type=float, default=1e-3)
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--samples", type=int, default=100_000, help="activation vectors collected from train blocks")
    p.add_argument("--out", required=True, help="SAE checkpoint file to write")


@torch.no_grad()
def collect_source(model, blocks, source: str, n: int, batch_size: int = 16) -> torch.Tensor:
    from moex.interp.features import collect

    out, got, step = [], 0, 0
    while got < n:
        x, _ = blocks.get_batch(step, batch_size)
        f = collect(model, x, select=lambda name: name == source)[source]
        out.append(f.reshape(-1, f.shape[-1]))
        got += out[-1].shape[0]
        step += 1
    return torch.cat(out)[:n]


@torch.no_grad()
def loss_with_hidden(model, blocks, layer: int, fn, batches: int = 8, batch_size: int = 16) -> float:
    """Mean val CE with layer `layer`'s dense MLP hidden units replaced by fn(hidden) (None = intact)."""
    mlp = model.blocks[layer].ffn
    orig = mlp.hidden
    if fn is not None:
        mlp.hidden = types.MethodType(lambda self, x: fn(orig(x)), mlp)
    try:
        losses = [float(model(x, y).ce_loss) for x, y in blocks.iter_eval(batch_size, batches)]
    finally:
        mlp.hidden = orig
    return sum(losses) / len(losses)


def run(args) -> int:
    from moex.data import build_data
    from moex.checkpoint.load import load_model
    from moex.interp.sae import SAEConfig, spliced_loss_recovered, train_sae

    loaded = load_model(args.path)
    layer, kind = args.source.split(".", 1)
    layer = int(layer.lstrip("L"))
    if kind != "mlp.post":
        raise SystemExit(f"--source must be a dense layer's hidden units (L<i>.mlp.post), got {args.source}")
    data = build_data(loaded.cfg.data, loaded.cfg.model.block_size, tokenizer_dir=loaded.run_dir / "tokenizer")
    x = collect_source(loaded.model, data.train, args.source, args.samples)
    cfg = SAEConfig(kind=args.kind, d_in=x.shape[1], d_latent=args.latents, k=args.k, l1_coef=args.l1,
                    steps=args.steps)
    sae, q = train_sae(x, cfg)
    clean = loss_with_hidden(loaded.model, data.val, layer, None)
    spliced = loss_with_hidden(loaded.model, data.val, layer, lambda h: sae(h)[0])
    zero = loss_with_hidden(loaded.model, data.val, layer, torch.zeros_like)
    q.update({"loss_clean": clean, "loss_spliced": spliced, "loss_zero_ablated": zero,
              "loss_recovered": spliced_loss_recovered(clean, spliced, zero), "source": args.source,
              "samples": int(x.shape[0])})
    sae.save(args.out, {"source": args.source, "quality": q, "checkpoint": str(loaded.ckpt_dir)})
    print(json.dumps(q, indent=2))
    print(f"wrote {args.out}")
    return 0


def sae_extra(paths: list[str]):
    """A feature hook for the suites: adds `sae:<name>` latents computed from their source."""
    from moex.interp.sae import SAE

    saes = []
    for p in paths:
        sae, blob = SAE.load(p)
        saes.append((f"sae:{Path(p).stem}[{blob['source']}]", blob["source"], sae))

    @torch.no_grad()
    def extra(feats: dict) -> dict:
        out = {}
        for name, source, sae in saes:
            if source not in feats:
                raise KeyError(f"SAE source {source} is not a feature source of this model")
            out[name] = sae.encode(feats[source].float())
        return out

    return extra
