"""Where documents come from: path resolution, streamed text / JSON Lines files and hub datasets.

A document is one row: a line of a text file, the `text_field` of one record of a
`.jsonl` file, or one row of a hub dataset (read by `datasets` in streaming mode).
Chess documents are single games. Nothing here holds a whole corpus in memory.
"""

from __future__ import annotations

import json
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
    """A file, or the sorted `*.txt` and `*.jsonl` files of a directory."""
    if path.is_file():
        return [path]
    files = sorted(p for p in path.iterdir() if p.suffix in (".txt", ".jsonl") and p.is_file())
    if not files:
        raise DataError(f"directory {path} holds no *.txt or *.jsonl files")
    return files


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
    """Stream the documents of a local text file/directory (one per line; a `.jsonl` file:
    the `text_field` of each record) or of a hub dataset split (`datasets` streaming mode).

    Memory stays bounded whatever the corpus size. A line that is not UTF-8 (or not a
    JSON record) is a DataError naming the file and line; a hub dataset without a
    network fails with a DataError naming it.
    """
    if is_hub_name(cfg, path):
        yield from _iter_hub(cfg, path.removeprefix(HUB_PREFIX), split)
        return
    for f in text_files(resolve_path(cfg, path)):
        check_text_file(f)
        lines = _iter_lines(f)
        yield from _iter_jsonl(f, lines, cfg.text_field) if f.suffix == ".jsonl" else lines


def _iter_lines(path: Path) -> Iterator[str]:
    """The lines of a text file without their line break (universal newlines, as `datasets` reads)."""
    try:
        with open(path, encoding="utf-8") as fh:
            for line in fh:
                yield line[:-1] if line.endswith("\n") else line
    except UnicodeDecodeError:
        line_no, byte = _first_bad_utf8(path)
        raise DataError(f"{path}:{line_no}: not UTF-8 text (byte {byte!r})") from None


def _first_bad_utf8(path: Path) -> tuple[int, bytes]:
    """(1-based line, offending byte) of the first line of `path` that is not UTF-8 (the error path only)."""
    with open(path, "rb") as fh:
        for i, raw in enumerate(fh, 1):
            try:
                raw.decode("utf-8")
            except UnicodeDecodeError as e:
                return i, raw[e.start : e.start + 1]
    return 0, b""


def _iter_jsonl(path: Path, lines: Iterator[str], field: str) -> Iterator[str]:
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{i}: not a JSON record ({e.msg}, column {e.colno})") from None
        if not isinstance(record, dict) or not isinstance(record.get(field), str):
            keys = sorted(record) if isinstance(record, dict) else type(record).__name__
            raise DataError(f"{path}:{i}: no text field {field!r} holding a string (data.text_field); got {keys}")
        yield record[field]


def count_text_documents(cfg: DataConfig, path: str, split: str = "train") -> int:
    """How many documents `iter_text_documents` yields; plain text files are counted by line breaks."""
    if is_hub_name(cfg, path):
        return sum(1 for _ in _iter_hub(cfg, path.removeprefix(HUB_PREFIX), split))
    n = 0
    for f in text_files(resolve_path(cfg, path)):
        check_text_file(f)
        breaks = None if f.suffix == ".jsonl" else _count_line_breaks(f)
        n += breaks if breaks is not None else sum(1 for _ in iter_text_documents(cfg, str(f)))
    return n


def _count_line_breaks(path: Path, block: int = 1 << 24) -> int | None:
    """Lines of a file that uses only \\n breaks (a last line without one counts), None if it has a \\r."""
    n, last = 0, b"\n"
    with open(path, "rb") as fh:
        while buf := fh.read(block):
            if b"\r" in buf:
                return None
            n += buf.count(b"\n")
            last = buf[-1:]
    return n + (last != b"\n")


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


def _n_val(n: int, val_fraction: float, what: str) -> int:
    if not 0.0 < val_fraction < 1.0:
        raise DataError(f"data.val_fraction={val_fraction} must lie in (0, 1)")
    if n < 2:
        raise DataError(f"need at least 2 {what} to split into train and val, got {n}")
    return min(n - 1, max(1, round(n * val_fraction)))


def game_split(n: int, val_fraction: float, seed: int) -> set[int]:
    """Indices of the val games: a seeded `val_fraction` of the n games (at least one), never in train."""
    n_val = _n_val(n, val_fraction, "games")
    return set(np.random.default_rng([seed, 7]).permutation(n)[:n_val].tolist())


def tail_split(n: int, val_fraction: float) -> int:
    """How many leading documents are train: the last `val_fraction` (at least one) are val, in order."""
    return n - _n_val(n, val_fraction, "documents")
