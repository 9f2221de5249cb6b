"""`moex prepare RECIPE [overrides]`: tokenize a recipe's data into sharded token files.

    moex prepare wikitext2-moex-small data.num_workers=8
    moex prepare recipes/gpt2-small-moex.yaml data.path=/data/owt data.shard_tokens=50000000

Streams the documents, encodes them with data.num_workers processes (0 = every
core) and writes train-*.bin / val-*.bin plus index.json under data.cache_dir,
where `moex train` with the same recipe finds them (it prepares them itself when
they are missing). The tokenizer goes to the run directory, as training puts it.
An interrupted preparation continues from its last complete shard.
"""

from __future__ import annotations

from pathlib import Path


def add_arguments(p) -> None:
    p.add_argument("recipe")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. data.num_workers=4")


def _split_line(split: str, entry: dict) -> str:
    n = len(entry["shards"])
    return (f"  {split:<5} {entry['documents']:>13,} documents {entry['tokens']:>15,} tokens "
            f"{n:>5} shard{'s' if n != 1 else ''}")


def run(args) -> int:
    from moex import config as C
    from moex.data import prepare_data
    from moex.data.stream import num_workers

    cfg = C.load(args.recipe, args.overrides)
    run_dir = Path(cfg.train.out_dir) / (cfg.train.run_name or "run")
    if cfg.train.init_from:  # the run will use the initial model's token ids: prepare with its tokenizer
        from moex.checkpoint.load import adopt_tokenizer

        run_dir.mkdir(parents=True, exist_ok=True)
        adopt_tokenizer(cfg.train.init_from, run_dir)
    d = cfg.data
    print(f"moex prepare: {args.recipe}  source {d.source}" + (f" {d.path}" if d.path else "")
          + f"  tokenizer {d.tokenizer}  workers {num_workers(d)}", flush=True)
    prep = prepare_data(d, run_dir / "tokenizer")
    index = prep.index
    tokens = sum(index["splits"][s]["tokens"] for s in index["splits"])
    if prep.cache_hit:
        print(f"already prepared: {prep.cache_dir}")
    else:
        rate = f" ({tokens / prep.seconds:,.0f} tokens/s)" if prep.seconds > 0 else ""
        print(f"prepared {prep.cache_dir} in {prep.seconds:.1f} s{rate}")
    for split, entry in index["splits"].items():
        print(_split_line(split, entry))
    print(f"  tokenizer {prep.tokenizer.identity()} (vocabulary {prep.tokenizer.vocab_size:,}, "
          f"{index['dtype']}) in {run_dir / 'tokenizer'}")
    return 0
