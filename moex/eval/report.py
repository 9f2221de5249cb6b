"""`moex eval`: perplexity, load balance and expert sparsity of a checkpoint."""

from __future__ import annotations

import json
import math
from pathlib import Path

from moex.eval.balance import format_balance
from moex.checkpoint.load import load_model
from moex.eval.perplexity import evaluate, sliding_window_nll

WORD_RULES = ("whitespace", "eol")  # eol: + one end-of-line per line (published WikiText numbers)


def _word_ppl(res: dict, words: int, stream_tokens: int) -> None:
    """Word-level perplexity: the same total NLL spread over the words those tokens spell
    (the text's word count scaled by the fraction of its tokens scored)."""
    scored_words = words * res["tokens"] / stream_tokens
    res["word_ppl"] = math.exp(min(res["total_nll"] / scored_words, 50.0))
    res["words"] = int(round(scored_words))


def evaluate_checkpoint(path: str | Path, *, split: str = "val", max_batches: int = 0, batch_size: int = 0,
                        progress: bool = True, stride: int = 0,
                        words: str = "whitespace") -> dict:
    """Evaluate a run/checkpoint on a split of its own data.

    `stride` 0 scores the split's non-overlapping blocks (block_size + 1 tokens each);
    a stride S in [1, block_size + 1] slides windows over its token stream instead.
    """
    from moex.data import build_data

    loaded = load_model(path)
    cfg = loaded.cfg
    data = build_data(cfg.data, cfg.model.block_size, tokenizer_dir=loaded.run_dir / "tokenizer")
    blocks = data.val if split == "val" else data.train
    bs = batch_size or cfg.train.batch_size
    if stride:
        tokens = blocks.tokens.read(0, blocks.n_tokens)  # the split's whole stream, all shards
        res = sliding_window_nll(loaded.model, tokens, block_size=cfg.model.block_size, stride=stride,
                                 batch_size=bs, progress=progress)
    else:
        res = evaluate(loaded.model, blocks, batch_size=bs, max_batches=max_batches, progress=progress)
    res.update({"checkpoint": str(loaded.ckpt_dir), "step": loaded.step, "split": split, "word_rule": words})
    info = data.info.get(split, {})
    if cfg.data.source == "text" and info.get("words") and info.get("tokens"):
        n_words = info["words"] + (info["documents"] if words == "eol" else 0)  # a document is one line
        _word_ppl(res, n_words, info["tokens"])
    return res


def evaluate_text(path: str | Path, data: str, *, split: str | None = None, hf_config: str | None = None,
                  text_field: str = "text", stride: int = 0, words: str = "whitespace", batch_size: int = 0,
                  progress: bool = True) -> dict:
    """Token- and word-level perplexity of a run on any text file/directory or hub dataset (`hf:NAME`).

    Every line (hub: every row) is encoded with the run's tokenizer (text runs: followed by a
    newline), exactly as training builds its token stream; `stride` as in
    `evaluate_checkpoint` (0 = non-overlapping blocks of block_size + 1 tokens).
    """
    import dataclasses

    import numpy as np

    from moex.data import load_tokenizer
    from moex.data.sources import count_words, is_hub_name, iter_text_documents

    loaded = load_model(path)
    cfg = loaded.cfg
    dcfg = dataclasses.replace(cfg.data, source="text", hf_config=hf_config, text_field=text_field)
    hub = is_hub_name(dcfg, data)
    if split and not hub:
        raise ValueError(f"--split {split!r} names a hub dataset split; {data!r} is a local file")
    tok = load_tokenizer(loaded.run_dir / "tokenizer")
    chunks, n_lines, n_words, batch = [], 0, 0, []
    sep = "\n" if cfg.data.source == "text" else ""  # as training streams them: chess games have no newline

    def flush():
        chunks.extend(np.asarray(ids, dtype=np.int64) for ids in tok.encode_batch([d + sep for d in batch]))
        batch.clear()

    for doc in iter_text_documents(dcfg, data, split or "test"):
        n_lines += 1
        n_words += count_words([doc], eol=words == "eol")
        batch.append(doc)
        if len(batch) == 1024:
            flush()
    flush()
    tokens = np.concatenate(chunks) if chunks else np.zeros(0, dtype=np.int64)
    T = cfg.model.block_size
    res = sliding_window_nll(loaded.model, tokens, block_size=T, stride=stride or T + 1,
                             batch_size=batch_size or cfg.train.batch_size, progress=progress)
    res.update({"checkpoint": str(loaded.ckpt_dir), "step": loaded.step, "data": data,
                "split": (split or "test") if hub else None, "lines": n_lines, "word_rule": words})
    if n_words:
        _word_ppl(res, n_words, len(tokens))
    return res


def format_report(res: dict) -> str:
    lines = [
        f"checkpoint {res['checkpoint']} (step {res['step']}), "
        + (f"data {res['data']}" + (f" split {res['split']}" if res.get("split") else "") if "data" in res
           else f"split {res['split']}")
        + f", {res['tokens']:,} tokens scored" + (f" (stride {res['stride']})" if res.get("stride") else ""),
        f"loss {res['loss']:.4f}  token ppl {res['ppl']:.3f}"
        + (f"  word ppl {res['word_ppl']:.2f} ({res['words']:,} words, {res['word_rule']} rule)"
           if "word_ppl" in res else ""),
    ]
    bal = format_balance(res["layers"])
    if bal:
        lines += ["load balance per sparse layer:", bal]
    return "\n".join(lines)


def write_report(res: dict, out: str | Path) -> None:
    Path(out).write_text(json.dumps(res, indent=2))
