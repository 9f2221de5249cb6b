"""`build_data`: DataConfig -> tokenizer + cached train/val token blocks."""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from moex.config import DataConfig
from moex.data.chess_games import read_pgn, random_games
from moex.data.errors import DataError
from moex.data.packing import TokenBlocks, atomic_write_text, read_meta, write_tokens
from moex.data.sources import (
    count_words,
    is_hub_name,
    load_text_documents,
    resolve_path,
    source_fingerprint,
    split_games,
    split_tail,
)
from moex.data.tokenizers import Tokenizer, build_tokenizer, has_saved_tokenizer, load_tokenizer, token_dtype

CACHE_VERSION = 1
RANDOM_GAME_MAX_PLIES = 120  # ~640 characters per game; keeps 2000 games to a few seconds


@dataclass
class DataBundle:
    tokenizer: Tokenizer
    train: TokenBlocks
    val: TokenBlocks
    info: dict = field(default_factory=dict)


def load_documents(cfg: DataConfig, *, progress: bool = False) -> tuple[list[str], list[str]]:
    """(train_docs, val_docs) exactly as `build_data` tokenizes them (e.g. held-out games for eval)."""
    if cfg.source == "chess_random":
        if cfg.num_games < 2:
            raise DataError(f"data.num_games={cfg.num_games}: chess_random needs at least 2 games")
        workers = (cfg.num_workers or os.cpu_count() or 1) if cfg.num_games >= 500 else 1
        games = random_games(
            cfg.num_games, cfg.seed, RANDOM_GAME_MAX_PLIES, cfg.max_game_chars, workers=workers, progress=progress
        )
        return split_games(games, cfg.val_fraction, cfg.seed)
    if cfg.source == "pgn":
        games = read_pgn(resolve_path(cfg, cfg.path), cfg.num_games, cfg.max_game_chars, cache_dir=cfg.cache_dir)
        return split_games(games, cfg.val_fraction, cfg.seed)
    if cfg.source == "text":
        docs = load_text_documents(cfg, cfg.path)
        if cfg.val_path is None:
            return split_tail(docs, cfg.val_fraction)
        if is_hub_name(cfg, cfg.path):  # with a hub dataset, val_path names a split
            return docs, load_text_documents(cfg, cfg.path, split=cfg.val_path)
        return docs, load_text_documents(cfg, cfg.val_path)
    raise DataError(f"unknown data.source {cfg.source!r}")


class _Documents:
    """Loads documents once, only if something needs them (a cache hit does not)."""

    def __init__(self, cfg: DataConfig, progress: bool):
        self.cfg, self.progress, self._docs = cfg, progress, None

    def get(self) -> tuple[list[str], list[str]]:
        if self._docs is None:
            self._docs = load_documents(self.cfg, progress=self.progress)
        return self._docs


def _tokenizer(cfg: DataConfig, tokenizer_dir: str | Path | None, docs: _Documents) -> Tokenizer:
    if has_saved_tokenizer(tokenizer_dir):
        tok = load_tokenizer(tokenizer_dir)
        if tok.kind != cfg.tokenizer:
            raise DataError(f"{tokenizer_dir} holds a {tok.kind} tokenizer but data.tokenizer={cfg.tokenizer!r}")
        return tok
    if cfg.tokenizer in ("chess", "byte"):
        tok = build_tokenizer(cfg.tokenizer)
    else:
        train_docs, val_docs = docs.get()
        # char: the vocabulary covers val (and the newlines between lines) so every character encodes
        texts = _stream_docs(cfg, train_docs + val_docs) if cfg.tokenizer == "char" else train_docs
        tok = build_tokenizer(cfg.tokenizer, texts, vocab_size=cfg.vocab_size, num_threads=cfg.num_workers)
    if tokenizer_dir is not None:
        tok.save(tokenizer_dir)
    return tok


def cache_key(cfg: DataConfig, tokenizer: Tokenizer) -> str:
    """Hash of what determines the token files: the input, the split, the tokenizer."""
    fields: dict = {"version": CACHE_VERSION, "source": cfg.source, "tokenizer": tokenizer.identity()}
    if cfg.source in ("chess_random", "pgn"):
        fields.update(num_games=cfg.num_games, max_game_chars=cfg.max_game_chars, seed=cfg.seed)
        fields.update(val_fraction=cfg.val_fraction)
    if cfg.source == "chess_random":
        fields["max_plies"] = RANDOM_GAME_MAX_PLIES
    if cfg.source == "pgn":
        fields["path"] = source_fingerprint(cfg, cfg.path)
    if cfg.source == "text":
        fields.update(path=source_fingerprint(cfg, cfg.path), hf_config=cfg.hf_config, text_field=cfg.text_field)
        if cfg.val_path is None:
            fields["val_fraction"] = cfg.val_fraction
        elif is_hub_name(cfg, cfg.path):
            fields["val_split"] = cfg.val_path
        else:
            fields["val_path"] = source_fingerprint(cfg, cfg.val_path)
    blob = json.dumps(fields, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:20]


def _stream_docs(cfg: DataConfig, docs: list[str]) -> list[str]:
    """Documents as they enter the token stream: text lines get their newline back."""
    return [d + "\n" for d in docs] if cfg.source == "text" else docs


def _write_cache(cache: Path, cfg: DataConfig, tok: Tokenizer, docs: _Documents, progress: bool) -> dict:
    train_docs, val_docs = (_stream_docs(cfg, d) for d in docs.get())
    meta: dict = {"dtype": token_dtype(tok.vocab_size).name, "tokenizer": tok.identity(), "source": cfg.source}
    for split, split_docs in (("train", train_docs), ("val", val_docs)):
        n_tokens = write_tokens(cache / f"{split}.bin", split_docs, tok, progress=progress)
        meta[split] = {
            "documents": len(split_docs),
            "tokens": n_tokens,
            "chars": sum(len(d) for d in split_docs),
            "words": count_words(split_docs),
        }
    atomic_write_text(cache / "meta.json", json.dumps(meta, indent=1))  # last: marks the cache complete
    return meta


def build_data(
    cfg: DataConfig, block_size: int, tokenizer_dir: str | Path | None = None, *, progress: bool = True
) -> DataBundle:
    """Tokenizer plus train/val `TokenBlocks` for `cfg`, tokenized once and cached.

    A tokenizer saved in `tokenizer_dir` is reused (resume/eval); otherwise one is
    built (or trained) and saved there. Token files live in
    `cfg.cache_dir/<source>-<hash>/` and are reused by every later call with the
    same input, split and tokenizer (any block_size).
    """
    if block_size < 1:
        raise DataError(f"block_size must be positive, got {block_size}")
    docs = _Documents(cfg, progress)
    tok = _tokenizer(cfg, tokenizer_dir, docs)
    cache = Path(cfg.cache_dir) / f"{cfg.source}-{cache_key(cfg, tok)}"
    meta = read_meta(cache / "meta.json")
    cache_hit = meta is not None
    if meta is None:
        meta = _write_cache(cache, cfg, tok, docs, progress)
    train = TokenBlocks(cache / "train.bin", block_size, meta["dtype"], seed=cfg.seed, name="train")
    val = TokenBlocks(cache / "val.bin", block_size, meta["dtype"], seed=cfg.seed + 1, name="val")
    info = {
        "source": cfg.source,
        "cache_dir": str(cache),
        "cache_hit": cache_hit,
        "tokenizer": tok.identity(),
        "vocab_size": tok.vocab_size,
        "block_size": block_size,
        "train": {**meta["train"], "blocks": len(train)},
        "val": {**meta["val"], "blocks": len(val)},
    }
    return DataBundle(tokenizer=tok, train=train, val=val, info=info)
