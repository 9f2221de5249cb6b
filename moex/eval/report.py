"""`moex eval`: perplexity, load balance and expert sparsity of a checkpoint."""

from __future__ import annotations

import json
import math
from pathlib import Path

from moex.eval.balance import format_balance
from moex.eval.load import load_model
from moex.eval.perplexity import evaluate


def evaluate_checkpoint(path: str | Path, *, split: str = "val", max_batches: int = 0, batch_size: int = 0,
                        data_overrides: dict | None = None, progress: bool = True) -> dict:
    """Evaluate a run/checkpoint on a split of its own data (or overridden data settings)."""
    from moex.data import build_data

    loaded = load_model(path)
    cfg = loaded.cfg
    for k, v in (data_overrides or {}).items():
        setattr(cfg.data, k, v)
    data = build_data(cfg.data, cfg.model.block_size, tokenizer_dir=loaded.run_dir / "tokenizer")
    blocks = data.val if split == "val" else data.train
    res = evaluate(loaded.model, blocks, batch_size=batch_size or cfg.train.batch_size, max_batches=max_batches,
                   progress=progress)
    res.update({"checkpoint": str(loaded.ckpt_dir), "step": loaded.step, "split": split})
    split_info = data.info.get(split, {})
    if cfg.data.source == "text" and split_info.get("words") and split_info.get("tokens"):
        # Word-level perplexity: the same total NLL spread over the words those tokens
        # spell (the split's word count scaled by the fraction of its tokens evaluated).
        words = split_info["words"] * res["tokens"] / split_info["tokens"]
        res["word_ppl"] = math.exp(min(res["total_nll"] / words, 50.0))
        res["words"] = int(words)
    return res


def format_report(res: dict) -> str:
    lines = [
        f"checkpoint {res['checkpoint']} (step {res['step']}), split {res['split']}, {res['tokens']:,} tokens",
        f"loss {res['loss']:.4f}  token ppl {res['ppl']:.3f}"
        + (f"  word ppl {res['word_ppl']:.2f} ({res['words']:,} words)" if "word_ppl" in res else ""),
    ]
    bal = format_balance(res["layers"])
    if bal:
        lines += ["load balance per sparse layer:", bal]
    return "\n".join(lines)


def write_report(res: dict, out: str | Path) -> None:
    Path(out).write_text(json.dumps(res, indent=2))
