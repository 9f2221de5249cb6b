"""Where documents come from: path resolution, text files / hub datasets, train/val splits.

Text goes through Hugging Face `datasets` (`load_dataset("text", ...)` for local
files; a hub name with `hf_config` and `text_field` otherwise). A document is one
row: a line of a text file. Chess documents are single games.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np

from moex.config import DataConfig
from moex.data.errors import DataError

DATA_ROOT_ENV = "MOEX_DATA_ROOT"
HUB_PREFIX = "hf:"


def data_root(cfg: DataConfig) -> Path:
    """`$MOEX_DATA_ROOT` if set, else `cfg.root`."""
    return Path(os.environ.get(DATA_ROOT_ENV) or cfg.root)


def is_hub_name(cfg: DataConfig, path: str) -> bool:
    """A hub dataset is named `hf:owner/name`, or any name given together with `hf_config`."""
    return path.startswith(HUB_PREFIX) or (cfg.hf_config is not None and not _candidates(cfg, path)[0].exists())


def _candidates(cfg: DataConfig, path: str) -> list[Path]:
    p = Path(path).expanduser()
    if p.is_absolute():
        return [p]
    return [data_root(cfg) / p, p]


def resolve_path(cfg: DataConfig, path: str | None) -> Path:
    """A local file or directory: absolute as is; relative against the data root, then the cwd."""
    if not path:
        raise DataError(f"data.source={cfg.source!r} needs data.path")
    tried = _candidates(cfg, path)
    for p in tried:
        if p.exists():
            return p.resolve()
    env = f" (${DATA_ROOT_ENV}={os.environ[DATA_ROOT_ENV]})" if os.environ.get(DATA_ROOT_ENV) else ""
    raise DataError(f"data file not found: {path!r}; tried {', '.join(str(p) for p in tried)}{env}")


def text_files(path: Path) -> list[Path]:
    """A file, or the sorted `*.txt` files of a directory."""
    if path.is_file():
        return [path]
    files = sorted(p for p in path.glob("*.txt") if p.is_file())
    if not files:
        raise DataError(f"directory {path} holds no *.txt files")
    return files


def _column(ds, field: str, where: str) -> list[str]:
    if field not in ds.column_names:
        raise DataError(f"{where}: no text field {field!r}; columns are {ds.column_names}")
    return list(ds[field])


def load_text_documents(cfg: DataConfig, path: str, split: str = "train") -> list[str]:
    """The documents (rows) of a local text file/directory or of a hub dataset split."""
    import datasets

    datasets.disable_progress_bars()
    cache = str(Path(cfg.cache_dir) / "hf")
    if is_hub_name(cfg, path):
        name = path.removeprefix(HUB_PREFIX)
        ds = datasets.load_dataset(name, cfg.hf_config, split=split, cache_dir=cache)
        return _column(ds, cfg.text_field, f"dataset {name} ({cfg.hf_config}, {split})")
    files = text_files(resolve_path(cfg, path))
    for f in files:
        check_text_file(f)
    try:
        ds = datasets.load_dataset("text", data_files={"train": [str(f) for f in files]}, split="train", cache_dir=cache)
    except Exception as e:  # datasets wraps the cause in DatasetGenerationError, naming no file
        cause = e.__cause__ or e
        raise DataError(f"{', '.join(map(str, files))}: cannot read as text ({type(cause).__name__}: {cause})") from e
    return _column(ds, "text", ", ".join(map(str, files)))


def check_text_file(path: Path, probe_bytes: int = 1 << 16) -> None:
    """A `DataError` naming `path` when it is empty, or binary / not UTF-8 (judged on its first bytes)."""
    if path.stat().st_size == 0:
        raise DataError(f"{path}: empty text file")
    with open(path, "rb") as f:
        head = f.read(probe_bytes)
    if b"\0" in head:
        raise DataError(f"{path}: binary file (NUL bytes), not text")
    try:
        head.decode("utf-8")
    except UnicodeDecodeError as e:
        if e.start < len(head) - 4:  # not just a multi-byte character cut at the probe's end
            raise DataError(f"{path}: not UTF-8 text (byte {e.start}: {head[e.start:e.start + 1]!r})") from None
    if not head.strip() and path.stat().st_size <= probe_bytes:
        raise DataError(f"{path}: text file holds only whitespace")


def iter_text_documents(cfg: DataConfig, path: str, split: str = "train") -> Iterator[str]:
    """Stream the documents of a local text file/directory (one per line, exactly the rows
    `load_text_documents` gives) or of a hub dataset split (`datasets` streaming mode).

    Memory stays bounded whatever the corpus size; a hub dataset without a network
    fails with a DataError naming it.
    """
    if is_hub_name(cfg, path):
        yield from _iter_hub(cfg, path.removeprefix(HUB_PREFIX), split)
        return
    for f in text_files(resolve_path(cfg, path)):
        check_text_file(f)
        with open(f, encoding="utf-8") as fh:  # universal newlines, as datasets' "text" loader reads
            for line in fh:
                yield line[:-1] if line.endswith("\n") else line


def _iter_hub(cfg: DataConfig, name: str, split: str) -> Iterator[str]:
    import datasets

    where = f"dataset {name} ({cfg.hf_config}, {split})"
    try:
        ds = datasets.load_dataset(name, cfg.hf_config, split=split, streaming=True)
        rows = iter(ds)
        first = next(rows, None)
    except (ConnectionError, OSError, ValueError) as e:
        raise DataError(f"{where}: cannot stream it from the Hugging Face hub ({type(e).__name__}: {e})") from None
    if first is None:
        return
    if cfg.text_field not in first:
        raise DataError(f"{where}: no text field {cfg.text_field!r}; columns are {sorted(first)}")
    yield first[cfg.text_field]
    for row in rows:
        yield row[cfg.text_field]


def count_words(lines: Iterable[str], *, eol: bool = False) -> int:
    """Words of text lines: whitespace-separated tokens per line, plus with `eol` one
    end-of-line per line (empty lines included), the convention of published word-level
    WikiText perplexities (valid: 213,886 + 3,760 lines = 217,646)."""
    return sum(len(line.split()) + eol for line in lines)


def source_fingerprint(cfg: DataConfig, path: str | None) -> list:
    """What identifies the input for caching: resolved files with size and mtime, or the hub name."""
    if not path:
        return []
    if is_hub_name(cfg, path):
        return [path, cfg.hf_config, cfg.text_field]
    resolved = resolve_path(cfg, path)
    files = text_files(resolved) if cfg.source == "text" else [resolved]
    return [[str(f), f.stat().st_size, f.stat().st_mtime_ns] for f in files]


def split_games(docs: list[str], val_fraction: float, seed: int) -> tuple[list[str], list[str]]:
    """Seeded split by game: `val_fraction` of the games (at least one) go to val, never to train."""
    if not 0.0 < val_fraction < 1.0:
        raise DataError(f"data.val_fraction={val_fraction} must lie in (0, 1)")
    n = len(docs)
    if n < 2:
        raise DataError(f"need at least 2 games to split into train and val, got {n}")
    n_val = min(n - 1, max(1, round(n * val_fraction)))
    perm = np.random.default_rng([seed, 7]).permutation(n)
    val_idx = set(perm[:n_val].tolist())
    train = [d for i, d in enumerate(docs) if i not in val_idx]
    val = [d for i, d in enumerate(docs) if i in val_idx]
    return train, val


def split_tail(docs: list[str], val_fraction: float) -> tuple[list[str], list[str]]:
    """The last `val_fraction` of the documents (at least one) are val; text keeps its order."""
    if not 0.0 < val_fraction < 1.0:
        raise DataError(f"data.val_fraction={val_fraction} must lie in (0, 1)")
    n = len(docs)
    if n < 2:
        raise DataError(f"need at least 2 documents to split into train and val, got {n}")
    n_val = min(n - 1, max(1, round(n * val_fraction)))
    return docs[: n - n_val], docs[n - n_val :]
