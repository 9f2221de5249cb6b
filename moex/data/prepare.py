"""Streaming, parallel, resumable tokenisation into sharded token files.

    Documents.pairs() -> chunks of one split's documents -> N worker processes encode
    them -> the parent writes the results in submission order into
    train-00000.bin, train-00001.bin, ..., val-00000.bin and index.json

A chunk closes at CHUNK_DOCS documents or CHUNK_CHARS characters, a shard after the
chunk that brings it to `shard_tokens` tokens. Both rules look at the documents
only, so the files are byte-identical for any number of workers. At most two
chunks per worker are in flight, so memory does not grow with the corpus.

A finished shard is renamed into place and then recorded in the index together
with the documents it covers; a killed preparation resumes after its last
recorded shard (skipping, not re-encoding, the documents before it) and ends
with the same files as an uninterrupted one.
"""

from __future__ import annotations

import itertools
import json
import multiprocessing
import os
from collections import deque
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from moex.data.sources import count_words
from moex.data.stream import SPLITS, Documents
from moex.data.tokenizers import Tokenizer, has_saved_tokenizer, load_tokenizer, token_dtype

INDEX_FILE = "index.json"
INDEX_VERSION = 1
TOKENIZER_DIR = "tokenizer"  # a copy of the tokenizer next to the tokens (the workers load it from there)
CHUNK_DOCS = 4096
CHUNK_CHARS = 1 << 20


def shard_name(split: str, k: int) -> str:
    return f"{split}-{k:05d}.bin"


def atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _load_index(out: Path) -> dict | None:
    try:
        index = json.loads((out / INDEX_FILE).read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None
    return index if isinstance(index, dict) and index.get("version") == INDEX_VERSION else None


def _shards_intact(out: Path, index: dict) -> bool:
    itemsize = np.dtype(index["dtype"]).itemsize
    for split in SPLITS:
        for shard in index["splits"][split]["shards"]:
            f = out / shard["name"]
            if not f.is_file() or f.stat().st_size != shard["tokens"] * itemsize:
                return False
    return True


def read_index(out: str | Path) -> dict | None:
    """The index of a complete preparation in `out` whose shards all have their recorded sizes, else None."""
    out = Path(out)
    index = _load_index(out)
    return index if index is not None and index.get("complete") and _shards_intact(out, index) else None


def shard_paths(out: str | Path, index: dict, split: str) -> list[Path]:
    return [Path(out) / s["name"] for s in index["splits"][split]["shards"]]


# ----------------------------------------------------------------------------- encoding

def encode_chunk(tok: Tokenizer, docs: list[str], sep: str, dtype: np.dtype) -> tuple[np.ndarray, int, int]:
    """(tokens of the documents each followed by `sep`, their characters, their words)."""
    texts = [d + sep for d in docs] if sep else docs
    ids = tok.encode_batch(texts)
    n = sum(map(len, ids))
    tokens = np.fromiter(itertools.chain.from_iterable(ids), dtype=dtype, count=n)
    return tokens, sum(map(len, texts)), count_words(docs)


_worker_tok: Tokenizer | None = None  # each worker process's own tokenizer, set by its initializer


def _init_worker(tok_dir: str) -> None:
    global _worker_tok
    _worker_tok = load_tokenizer(tok_dir)


def _encode_in_worker(docs: list[str], sep: str, dtype: np.dtype) -> tuple[np.ndarray, int, int]:
    return encode_chunk(_worker_tok, docs, sep, dtype)


def _chunks(pairs: Iterator[tuple[str, str]], skip: dict[str, int]) -> Iterator[tuple[str, list[str]]]:
    """Group each split's documents into chunks, after the first `skip[split]` documents of it."""
    buf: dict[str, list[str]] = {s: [] for s in SPLITS}
    chars, seen = dict.fromkeys(SPLITS, 0), dict.fromkeys(SPLITS, 0)
    for split, doc in pairs:
        seen[split] += 1
        if seen[split] <= skip[split]:
            continue
        buf[split].append(doc)
        chars[split] += len(doc)
        if len(buf[split]) >= CHUNK_DOCS or chars[split] >= CHUNK_CHARS:
            yield split, buf[split]
            buf[split], chars[split] = [], 0
    for split in SPLITS:
        if buf[split]:
            yield split, buf[split]


def _encoded(chunks: Iterator[tuple[str, list[str]]], tok: Tokenizer, tok_dir: Path, workers: int, sep: str,
             dtype: np.dtype) -> Iterator[tuple[str, int, tuple[np.ndarray, int, int]]]:
    """(split, documents, encode_chunk result) per chunk, in chunk order; a bounded window in flight.

    Encodes in this process (same output) when one worker is asked for, when the whole
    stream is at most `workers` chunks (a pool would cost more than it saves), or in a
    daemonic process, which may not start children (e.g. a rank run by multiprocessing).
    """
    head = list(itertools.islice(chunks, workers + 1))
    chunks = itertools.chain(head, chunks)
    if workers <= 1 or len(head) <= workers or multiprocessing.current_process().daemon:
        for split, docs in chunks:
            yield split, len(docs), encode_chunk(tok, docs, sep, dtype)
        return
    from concurrent.futures import ProcessPoolExecutor

    # fork: the workers only tokenize, and unlike spawn it does not re-import the caller's __main__
    ctx = multiprocessing.get_context("fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn")
    pool = ProcessPoolExecutor(workers, mp_context=ctx, initializer=_init_worker, initargs=(str(tok_dir),))
    window: deque = deque()
    try:
        for split, docs in chunks:
            window.append((split, len(docs), pool.submit(_encode_in_worker, docs, sep, dtype)))
            if len(window) >= 2 * workers:
                split, n, fut = window.popleft()
                yield split, n, fut.result()
        while window:
            split, n, fut = window.popleft()
            yield split, n, fut.result()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


# ----------------------------------------------------------------------------- writing

class _ShardWriter:
    """Appends one split's tokens to its current shard; `close` renames it into place and records it."""

    def __init__(self, out: Path, split: str, entry: dict, shard_tokens: int):
        self.out, self.split, self.entry, self.shard_tokens = out, split, entry, shard_tokens
        self.f = None
        self.count = dict(tokens=0, documents=0, chars=0, words=0)

    @property
    def name(self) -> str:
        return shard_name(self.split, len(self.entry["shards"]))

    def add(self, tokens: np.ndarray, n_docs: int, chars: int, words: int) -> bool:
        """Append a chunk; True when this completed a shard."""
        if self.f is None:
            self.tmp = self.out / f".{self.name}.tmp"
            self.f = open(self.tmp, "wb")
        tokens.tofile(self.f)
        for k, v in (("tokens", len(tokens)), ("documents", n_docs), ("chars", chars), ("words", words)):
            self.count[k] += v
        return self.count["tokens"] >= self.shard_tokens and self.close()

    def close(self) -> bool:
        if self.f is None:
            return False
        self.f.flush()
        os.fsync(self.f.fileno())
        self.f.close()
        self.f = None
        name = self.name
        os.replace(self.tmp, self.out / name)
        self.entry["shards"].append({"name": name, "tokens": self.count["tokens"],
                                     "documents": self.count["documents"]})
        for k, v in self.count.items():
            self.entry[k] += v
        self.count = dict.fromkeys(self.count, 0)
        return True

    def abandon(self) -> None:
        if self.f is not None:
            self.f.close()
            self.f = None
            self.tmp.unlink(missing_ok=True)


def _fresh_index(tok: Tokenizer, docs: Documents) -> dict:
    empty = dict(shards=[], documents=0, tokens=0, chars=0, words=0)
    return {"version": INDEX_VERSION, "complete": False, "source": docs.cfg.source, "tokenizer": tok.identity(),
            "vocab_size": tok.vocab_size, "dtype": token_dtype(tok.vocab_size).name,
            "splits": {s: dict(empty, shards=[]) for s in SPLITS}}


def _start(out: Path, tok: Tokenizer, docs: Documents) -> dict:
    """The index to continue from: the recorded shards of an interrupted run, or a fresh one."""
    out.mkdir(parents=True, exist_ok=True)
    for stray in out.glob(".*.tmp"):
        stray.unlink()
    index = _load_index(out)
    if index is None or index["tokenizer"] != tok.identity() or not _shards_intact(out, index):
        for old in out.glob("*.bin"):
            old.unlink()
        index = _fresh_index(tok, docs)
    tok_dir = out / TOKENIZER_DIR
    if not has_saved_tokenizer(tok_dir) or load_tokenizer(tok_dir).identity() != tok.identity():
        tok.save(tok_dir)
    atomic_write_text(out / INDEX_FILE, json.dumps(index, indent=1))
    return index


def prepare(docs: Documents, tok: Tokenizer, out: str | Path, *, workers: int = 1, shard_tokens: int = 100_000_000,
            progress: bool = False, on_shard: Callable[[str, int], None] | None = None) -> dict:
    """Tokenize `docs` into sharded token files plus `index.json` in `out`; return the index.

    A complete preparation already in `out` is returned as is; an interrupted one is
    continued. `on_shard(split, shards_done)` runs after each shard is recorded.
    """
    out = Path(out)
    index = read_index(out)
    if index is not None:
        return index
    index = _start(out, tok, docs)
    entries = index["splits"]
    writers = {s: _ShardWriter(out, s, entries[s], shard_tokens) for s in SPLITS}
    skip = {s: entries[s]["documents"] for s in SPLITS}
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=docs.total, initial=sum(skip.values()), desc="tokenizing", unit="doc", leave=False)
    dtype = token_dtype(tok.vocab_size)
    try:
        for split, n_docs, (tokens, chars, words) in _encoded(_chunks(docs.pairs(), skip), tok, out / TOKENIZER_DIR,
                                                              workers, docs.sep, dtype):
            if writers[split].add(tokens, n_docs, chars, words):
                atomic_write_text(out / INDEX_FILE, json.dumps(index, indent=1))
                if on_shard:
                    on_shard(split, len(entries[split]["shards"]))
            if bar is not None:
                bar.update(n_docs)
        for w in writers.values():
            w.close()
        index["complete"] = True
        atomic_write_text(out / INDEX_FILE, json.dumps(index, indent=1))
    finally:
        for w in writers.values():
            w.abandon()
        if bar is not None:
            bar.close()
    return index
