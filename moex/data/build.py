"""`build_data`: DataConfig -> tokenizer + prepared (sharded, cached) train/val token blocks."""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

from moex.config import DataConfig
from moex.data.errors import DataError
from moex.data.packing import TokenBlocks
from moex.data.prepare import prepare, read_index, shard_paths
from moex.data.sources import is_hub_name, source_fingerprint
from moex.data.stream import RANDOM_GAME_MAX_PLIES, SPLITS, TRAIN, Documents, num_workers
from moex.data.tokenizers import Tokenizer, build_tokenizer, has_saved_tokenizer, load_tokenizer

CACHE_VERSION = 2  # 2: sharded token files with index.json (the token stream itself is unchanged)


@dataclass
class DataBundle:
    tokenizer: Tokenizer
    train: TokenBlocks
    val: TokenBlocks
    info: dict = field(default_factory=dict)


@dataclass
class Prepared:
    """Where a config's tokens live and what they hold (`index` is the parsed index.json)."""

    tokenizer: Tokenizer
    cache_dir: Path
    index: dict
    cache_hit: bool
    seconds: float = 0.0


def _tokenizer(cfg: DataConfig, tokenizer_dir: str | Path | None, docs: Documents) -> Tokenizer:
    if has_saved_tokenizer(tokenizer_dir):
        tok = load_tokenizer(tokenizer_dir)
        if tok.kind != cfg.tokenizer:
            raise DataError(f"{tokenizer_dir} holds a {tok.kind} tokenizer but data.tokenizer={cfg.tokenizer!r}")
        return tok
    if cfg.tokenizer in ("chess", "byte"):
        tok = build_tokenizer(cfg.tokenizer)
    elif cfg.tokenizer == "char":  # the vocabulary covers val (and the newlines between lines) so every character encodes
        tok = build_tokenizer("char", (d + docs.sep for _, d in docs.pairs()))
    else:  # sentencepiece samples at most 2M train documents from the stream (input_sentence_size)
        tok = build_tokenizer(cfg.tokenizer, docs.texts(TRAIN), vocab_size=cfg.vocab_size,
                              num_threads=num_workers(cfg))
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


def prepare_data(cfg: DataConfig, tokenizer_dir: str | Path | None = None, *, progress: bool = True) -> Prepared:
    """Tokenize `cfg`'s documents once into `cfg.cache_dir/<source>-<hash>/` (sharded, resumable).

    A tokenizer saved in `tokenizer_dir` is reused (resume/eval); otherwise one is
    built (or trained) and saved there. A complete preparation with the same input,
    split and tokenizer is reused as is; an interrupted one is continued.
    """
    docs = Documents(cfg, progress=progress)
    tok = _tokenizer(cfg, tokenizer_dir, docs)
    cache = Path(cfg.cache_dir) / f"{cfg.source}-{cache_key(cfg, tok)}"
    index = read_index(cache)
    if index is not None:
        return Prepared(tok, cache, index, cache_hit=True)
    t0 = time.perf_counter()
    index = prepare(docs, tok, cache, workers=num_workers(cfg), shard_tokens=cfg.shard_tokens, progress=progress)
    return Prepared(tok, cache, index, cache_hit=False, seconds=time.perf_counter() - t0)


def build_data(
    cfg: DataConfig, block_size: int, tokenizer_dir: str | Path | None = None, *, progress: bool = True
) -> DataBundle:
    """Tokenizer plus train/val `TokenBlocks` for `cfg`, prepared once (see `prepare_data`) and
    read lazily from the shards by every later call with the same data (any block_size)."""
    if block_size < 1:
        raise DataError(f"block_size must be positive, got {block_size}")
    prep = prepare_data(cfg, tokenizer_dir, progress=progress)
    index, cache = prep.index, prep.cache_dir
    train = TokenBlocks(shard_paths(cache, index, "train"), block_size, index["dtype"], seed=cfg.seed, name="train")
    val = TokenBlocks(shard_paths(cache, index, "val"), block_size, index["dtype"], seed=cfg.seed + 1, name="val")
    info = {
        "source": cfg.source,
        "cache_dir": str(cache),
        "cache_hit": prep.cache_hit,
        "tokenizer": prep.tokenizer.identity(),
        "vocab_size": prep.tokenizer.vocab_size,
        "block_size": block_size,
    }
    for split, blocks in zip(SPLITS, (train, val)):
        entry = index["splits"][split]
        info[split] = {k: entry[k] for k in ("documents", "tokens", "chars", "words")}
        info[split].update(shards=len(entry["shards"]), blocks=len(blocks))
    return DataBundle(tokenizer=prep.tokenizer, train=train, val=val, info=info)
