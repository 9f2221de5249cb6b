"""`moex generate RUN --prompt TEXT`: sample text from a trained run with a KV cache.

    moex generate runs/chess-tiny --prompt ";1.e4 e5 2.Nf3" --max-new-tokens 80 --seed 0
    moex generate runs/wikitext2-moex-small --prompt "The history of" --top-p 0.9 --temperature 0.8

The prompt is encoded with the run's own tokenizer; a fixed --seed gives the same
text every time. Expert-choice models route token-choice top-k at inference (as
in `moex eval`), Monet/PEER use their BatchNorm running statistics.
"""

from __future__ import annotations

import argparse
import sys


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("path", help="run directory or checkpoint directory")
    p.add_argument("--prompt", required=True, help="text to continue (encoded with the run's tokenizer)")
    p.add_argument("--max-new-tokens", type=int, default=100)
    p.add_argument("--temperature", type=float, default=1.0, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=0, help="sample among the k most likely tokens (0 = all)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (1 = off)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--num-samples", type=int, default=1)


def _check(args) -> None:
    if args.max_new_tokens < 0:
        raise ValueError(f"--max-new-tokens must be >= 0, got {args.max_new_tokens}")
    if args.temperature < 0:
        raise ValueError(f"--temperature must be >= 0, got {args.temperature}")
    if args.top_k < 0:
        raise ValueError(f"--top-k must be >= 0, got {args.top_k}")
    if not 0.0 < args.top_p <= 1.0:
        raise ValueError(f"--top-p must lie in (0, 1], got {args.top_p}")
    if args.num_samples < 1:
        raise ValueError(f"--num-samples must be >= 1, got {args.num_samples}")


def run(args) -> int:
    import torch

    from moex.data import load_tokenizer
    from moex.checkpoint.load import load_model
    from moex.models.sampling import generate

    try:
        _check(args)
        loaded = load_model(args.path)
        tok = load_tokenizer(loaded.run_dir / "tokenizer")
        ids = tok.encode(args.prompt)
        if not ids:
            raise ValueError("--prompt encodes to no tokens")
    except (ValueError, FileNotFoundError) as e:  # DataError is a ValueError
        print(f"moex: error: {e}", file=sys.stderr)
        return 2
    g = torch.Generator().manual_seed(args.seed)
    idx = torch.tensor([ids] * args.num_samples, dtype=torch.long)
    out = generate(loaded.model, idx, args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                   top_p=args.top_p, generator=g)
    for i, row in enumerate(out.tolist()):
        if args.num_samples > 1:
            print(f"--- sample {i}")
        print(tok.decode(row))
    return 0
