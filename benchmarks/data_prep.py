"""Data preparation (`moex prepare`): tokens/s and peak memory of the whole process tree vs corpus size and workers.

Corpora are built locally into a temporary directory (deleted afterwards, never
committed): WikiText-2 train lines from the shared data, shuffled afresh with a
fixed seed on every repetition, until the file reaches the size asked for. Each
(size, workers) cell runs `python -m moex.cli prepare wikitext2-moex-small` in a
fresh process with its own cache directory and a tokenizer already in the run
directory (sentencepiece 8k trained once on WikiText-2 train, as the recipe
does; its training time is reported apart), so the cell times streaming,
tokenizing and writing shards only.

Peak memory: the process tree (the command and its tokenizing workers) is polled
every 0.1 s; "PSS" sums proportional set sizes (shared pages split between the
processes that map them, so forked workers are not counted twice), "RSS" sums
resident sets (an upper bound). tokens/s = all tokens written / wall time of the
command (interpreter start and the line-counting pass included).

    PYTHONPATH=. python benchmarks/data_prep.py [--sizes 100MB,300MB,1GB] [--workers 1,2,all] [--tokenizer byte]

Writes benchmarks/results/data_prep.{json,md} (or --out STEM).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data"
SOURCE = DATA / "wikitext-2" / "train.txt"
RECIPE = "wikitext2-moex-small"
UNITS = {"KB": 10**3, "MB": 10**6, "GB": 10**9}


def parse_size(s: str) -> int:
    s = s.strip().upper()
    for unit, mult in UNITS.items():
        if s.endswith(unit):
            return int(float(s[: -len(unit)]) * mult)
    return int(s)


def human(n: int) -> str:
    for unit in ("GB", "MB", "KB"):
        if n >= UNITS[unit]:
            return f"{n / UNITS[unit]:g} {unit}"
    return f"{n} B"


def build_corpus(path: Path, size: int, seed: int = 0) -> int:
    """WikiText-2 train lines, reshuffled each repetition, until `size` bytes; returns the line count."""
    lines = SOURCE.read_bytes().splitlines(keepends=True)
    rng = random.Random(seed)
    written = n = 0
    with open(path, "wb") as f:
        while written < size:
            rng.shuffle(lines)
            for line in lines:
                f.write(line)
                written += len(line)
                n += 1
                if written >= size:
                    break
    return n


class TreeMemory:
    """Peak summed PSS and RSS of a process and all its descendants, polled in a thread."""

    def __init__(self, pid: int, interval: float = 0.1):
        self.root, self.interval = psutil.Process(pid), interval
        self.peak_pss = self.peak_rss = self.max_procs = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()

    def _poll(self):
        while not self._stop.is_set():
            try:
                procs = [self.root, *self.root.children(recursive=True)]
            except psutil.NoSuchProcess:
                return
            pss = rss = 0
            for p in procs:
                try:
                    info = p.memory_full_info()
                    pss, rss = pss + info.pss, rss + info.rss
                except (psutil.NoSuchProcess, psutil.AccessDenied):
                    pass
            self.peak_pss, self.peak_rss = max(self.peak_pss, pss), max(self.peak_rss, rss)
            self.max_procs = max(self.max_procs, len(procs))
            self._stop.wait(self.interval)

    def stop(self):
        self._stop.set()
        self._thread.join()


def run_prepare(tmp: Path, corpus: Path, tok_dir: Path, workers: int, tokenizer: str) -> dict:
    cache, runs = tmp / "cache", tmp / "runs"
    shutil.rmtree(cache, ignore_errors=True)
    shutil.rmtree(runs, ignore_errors=True)
    shutil.copytree(tok_dir, runs / "r" / "tokenizer")
    cmd = [sys.executable, "-m", "moex.cli", "prepare", RECIPE, f"data.path={corpus}", f"data.tokenizer={tokenizer}",
           f"data.cache_dir={cache}", f"data.num_workers={workers}", f"train.out_dir={runs}", "train.run_name=r"]
    env = dict(os.environ, PYTHONPATH=str(REPO), MOEX_DATA_ROOT=str(DATA))
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    mem = TreeMemory(proc.pid)
    out, err = proc.communicate()
    wall = time.perf_counter() - t0
    mem.stop()
    if proc.returncode:
        raise SystemExit(f"prepare failed ({proc.returncode}):\n{out}\n{err[-3000:]}")
    index = json.loads(next(cache.glob("*/index.json")).read_text())
    tokens = sum(s["tokens"] for s in index["splits"].values())
    shutil.rmtree(cache)
    return {"workers": workers, "wall_s": wall, "tokens": tokens, "tokens_per_s": tokens / wall,
            "documents": sum(s["documents"] for s in index["splits"].values()),
            "shards": sum(len(s["shards"]) for s in index["splits"].values()),
            "peak_pss_bytes": mem.peak_pss, "peak_rss_bytes": mem.peak_rss, "processes": mem.max_procs}


def train_tokenizer(tmp: Path, tokenizer: str) -> tuple[Path, float]:
    """The recipe's tokenizer, built as `moex train` builds it, on WikiText-2 train."""
    sys.path.insert(0, str(REPO))
    from moex import config as C
    from moex.data import Documents, build_tokenizer
    from moex.data.stream import TRAIN, num_workers

    cfg = C.load(RECIPE, [f"data.path={SOURCE}", f"data.tokenizer={tokenizer}"]).data
    t0 = time.perf_counter()
    texts = Documents(cfg).texts(TRAIN) if tokenizer == "sentencepiece" else None
    build_tokenizer(tokenizer, texts, vocab_size=cfg.vocab_size, num_threads=num_workers(cfg)).save(tmp / "tokenizer")
    return tmp / "tokenizer", time.perf_counter() - t0


def table(res: dict) -> str:
    lines = [f"`moex prepare` ({res['tokenizer']} tokenizer), {res['cpu_count']} CPUs, {res['platform']}; "
             f"tokenizer training {res['tokenizer_train_s']:.1f} s (not in the rows)", "",
             "| corpus | workers | tokens | wall s | tokens/s | vs fewest workers | peak PSS (tree) | peak RSS (tree) |",
             "|---|---|---|---|---|---|---|---|"]
    for r in res["rows"]:
        lines.append(f"| {human(r['size_bytes'])} | {r['workers']} | {r['tokens']:,} | {r['wall_s']:.1f} | "
                     f"{r['tokens_per_s']:,.0f} | {r['speedup']:.2f}x | {r['peak_pss_bytes'] / 2**20:,.0f} MiB | "
                     f"{r['peak_rss_bytes'] / 2**20:,.0f} MiB |")
    for w, ratio in res["pss_largest_over_smallest"].items():
        lines.append(f"\npeak PSS, largest / smallest corpus, {w} worker(s): {ratio:.2f}")
    return "\n".join(lines) + "\n"


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="100MB,300MB,1GB", help="corpus sizes, e.g. 20MB,50MB")
    ap.add_argument("--workers", default="1,2,all", help="worker counts; all = os.cpu_count()")
    ap.add_argument("--tokenizer", default="sentencepiece", choices=["sentencepiece", "byte"])
    ap.add_argument("--tmp", help="where corpora and caches go (default: a new temporary directory, removed)")
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "data_prep"))
    args = ap.parse_args()
    sizes = [parse_size(s) for s in args.sizes.split(",")]
    workers = sorted({(os.cpu_count() or 1) if w == "all" else int(w) for w in args.workers.split(",")})
    tmp = Path(args.tmp or tempfile.mkdtemp(prefix="moex-data-prep-"))
    tmp.mkdir(parents=True, exist_ok=True)
    try:
        tok_dir, tok_s = train_tokenizer(tmp, args.tokenizer)
        rows = []
        for size in sizes:
            corpus = tmp / "corpus.txt"
            build_corpus(corpus, size)
            base = None
            for w in workers:
                r = {"size_bytes": size, **run_prepare(tmp, corpus, tok_dir, w, args.tokenizer)}
                base = base or r["tokens_per_s"]
                r["speedup"] = r["tokens_per_s"] / base  # over the fewest workers, same corpus
                rows.append(r)
                print(f"{human(size)} workers {w}: {r['tokens']:,} tokens, {r['wall_s']:.1f} s, "
                      f"{r['tokens_per_s']:,.0f} tokens/s, peak PSS {r['peak_pss_bytes'] / 2**20:,.0f} MiB", flush=True)
            corpus.unlink()
    finally:
        if not args.tmp:
            shutil.rmtree(tmp, ignore_errors=True)
    ratio = {}
    for w in workers:
        by_size = [r for r in rows if r["workers"] == w]
        ratio[str(w)] = by_size[-1]["peak_pss_bytes"] / by_size[0]["peak_pss_bytes"]
    res = {"tokenizer": args.tokenizer, "tokenizer_train_s": tok_s, "cpu_count": os.cpu_count(),
           "platform": platform.platform(), "python": platform.python_version(), "rows": rows,
           "pss_largest_over_smallest": ratio}
    sys.path.insert(0, str(REPO / "benchmarks"))
    from moe_layer import write_results

    write_results(args.out, res, table(res))


if __name__ == "__main__":
    main()
