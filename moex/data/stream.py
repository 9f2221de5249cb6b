"""The documents of a `DataConfig` as one ordered stream of (split, document) pairs.

The order and the train/val split depend on the config alone, never on a worker
count or on a resume:
- text without `val_path`: the last `val_fraction` of the lines are val (in order);
- text with `val_path`: every document of `path`, then every one of `val_path`
  (with a hub dataset, `val_path` names a split of it);
- chess (`chess_random`, `pgn`): a seeded `val_fraction` of the games are val.
Text streams from disk or the hub; chess games are generated or parsed once
(their number is bounded by `data.num_games`).
"""

from __future__ import annotations

import os
from typing import Iterator

from moex.config import DataConfig
from moex.data.chess_games import random_games, read_pgn
from moex.data.errors import DataError
from moex.data.sources import (
    count_text_documents,
    game_split,
    is_hub_name,
    iter_text_documents,
    resolve_path,
    tail_split,
)

TRAIN, VAL = "train", "val"
SPLITS = (TRAIN, VAL)
RANDOM_GAME_MAX_PLIES = 120  # ~640 characters per game; keeps 2000 games to a few seconds


def num_workers(cfg: DataConfig) -> int:
    """`data.num_workers`, 0 meaning every core."""
    return cfg.num_workers or os.cpu_count() or 1


class Documents:
    """Re-iterable stream of a config's documents; `pairs()` starts a fresh pass each call."""

    def __init__(self, cfg: DataConfig, *, progress: bool = False):
        if cfg.source not in ("chess_random", "pgn", "text"):
            raise DataError(f"unknown data.source {cfg.source!r}; known: chess_random, pgn, text")
        self.cfg, self.progress = cfg, progress
        self.sep = "\n" if cfg.source == "text" else ""  # text lines get their newline back in the token stream
        self._games: list[str] | None = None
        self._n_text: int | None = None

    @property
    def total(self) -> int | None:
        """Number of documents when known without reading a separate val source (for progress bars)."""
        if self.cfg.source != "text":
            return len(self._chess_games())
        return self._count() if self.cfg.val_path is None else None

    def pairs(self) -> Iterator[tuple[str, str]]:
        """(split, document) for every document, in stream order."""
        cfg = self.cfg
        if cfg.source != "text":
            games = self._chess_games()
            val = game_split(len(games), cfg.val_fraction, cfg.seed)
            for i, g in enumerate(games):
                yield (VAL if i in val else TRAIN), g
        elif cfg.val_path is None:
            n_train = tail_split(self._count(), cfg.val_fraction)
            for i, d in enumerate(iter_text_documents(cfg, cfg.path)):
                yield (TRAIN if i < n_train else VAL), d
        else:
            for d in iter_text_documents(cfg, cfg.path):
                yield TRAIN, d
            for d in self._val_source():
                yield VAL, d

    def texts(self, split: str) -> Iterator[str]:
        """The documents of one split (without the stream's newline)."""
        if self.cfg.source == "text" and self.cfg.val_path is not None:
            yield from (iter_text_documents(self.cfg, self.cfg.path) if split == TRAIN else self._val_source())
            return
        yield from (d for s, d in self.pairs() if s == split)

    def _val_source(self) -> Iterator[str]:
        cfg = self.cfg
        if is_hub_name(cfg, cfg.path):  # with a hub dataset, val_path names a split
            return iter_text_documents(cfg, cfg.path, split=cfg.val_path)
        return iter_text_documents(cfg, cfg.val_path)

    def _count(self) -> int:
        if self._n_text is None:
            self._n_text = count_text_documents(self.cfg, self.cfg.path)
        return self._n_text

    def _chess_games(self) -> list[str]:
        if self._games is None:
            cfg = self.cfg
            if cfg.source == "chess_random":
                if cfg.num_games < 2:
                    raise DataError(f"data.num_games={cfg.num_games}: chess_random needs at least 2 games")
                workers = num_workers(cfg) if cfg.num_games >= 500 else 1
                self._games = random_games(cfg.num_games, cfg.seed, RANDOM_GAME_MAX_PLIES, cfg.max_game_chars,
                                           workers=workers, progress=self.progress)
            else:
                self._games = read_pgn(resolve_path(cfg, cfg.path), cfg.num_games, cfg.max_game_chars,
                                       cache_dir=cfg.cache_dir)
        return self._games


def load_documents(cfg: DataConfig, *, progress: bool = False) -> tuple[list[str], list[str]]:
    """(train_docs, val_docs) as lists, exactly the documents the prepared data holds
    (for small uses such as held-out games; a large corpus should be streamed with `Documents`)."""
    out: dict[str, list[str]] = {TRAIN: [], VAL: []}
    for split, doc in Documents(cfg, progress=progress).pairs():
        out[split].append(doc)
    return out[TRAIN], out[VAL]
