"""Streaming, parallel, resumable data preparation (moex/data/prepare.py, stream.py) and sharded reading.

References are independent of the pipeline: each document encoded on its own in one
process, the split rule written out by hand, one contiguous token file.
"""

import json
import re
from pathlib import Path

import numpy as np
import pytest

import moex.data.prepare as prep_mod
import moex.data.stream as stream_mod
from moex.cli import main
from moex.config import DataConfig
from moex.data import ByteTokenizer, DataError, Documents, TokenBlocks, build_data, load_documents
from moex.data.prepare import prepare, read_index, shard_paths
from moex.data.sources import count_text_documents, iter_text_documents
from moex.data.tokenizers import HFTokenizer, token_dtype


@pytest.fixture(autouse=True)
def small_chunks(monkeypatch):
    monkeypatch.setattr(prep_mod, "CHUNK_DOCS", 7)  # many chunks and shards from a tiny corpus


def corpus(tmp_path, n=120, name="c.txt"):
    lines = [f"doc {i}: " + "abc éà "[: i % 8] * (i % 5) for i in range(n)]
    path = tmp_path / name
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path, lines


def text_cfg(tmp_path, path, **kw):
    kw = {"source": "text", "path": str(path), "tokenizer": "byte", "val_fraction": 0.1,
          "cache_dir": str(tmp_path / "cache"), **kw}
    return DataConfig(**kw)


def split_tokens(out, split, dtype=np.uint16):
    return np.concatenate([np.fromfile(p, dtype=dtype) for p in shard_paths(out, read_index(out), split)])


def files(out):
    return {p.name: p.read_bytes() for p in sorted(Path(out).glob("*.bin"))}


def reference(tok, docs):
    """Each document encoded on its own, newline appended, concatenated."""
    return [i for d in docs for i in tok.encode(d + "\n")]


def test_output_is_identical_for_any_worker_count_and_equals_plain_encoding(tmp_path):
    path, lines = corpus(tmp_path)
    docs = Documents(text_cfg(tmp_path, path))
    tok = ByteTokenizer()
    outs = [tmp_path / f"w{w}" for w in (1, 2, 3)]
    for w, out in zip((1, 2, 3), outs):
        prepare(docs, tok, out, workers=w, shard_tokens=200)
    ref_files = files(outs[0])
    assert len([n for n in ref_files if n.startswith("train-")]) > 3  # really sharded
    for out in outs[1:]:
        assert files(out) == ref_files
        assert read_index(out) == read_index(outs[0])
    # split rule by hand: the last round(120 * 0.1) = 12 lines are val
    assert split_tokens(outs[0], "train").tolist() == reference(tok, lines[:108])
    assert split_tokens(outs[0], "val").tolist() == reference(tok, lines[108:])
    index = read_index(outs[0])
    assert index["splits"]["val"]["documents"] == 12 and index["dtype"] == "uint16"
    assert index["splits"]["train"]["words"] == sum(len(x.split()) for x in lines[:108])
    assert index["tokenizer"] == tok.identity()
    assert all(s["tokens"] >= 200 for s in index["splits"]["train"]["shards"][:-1])  # only the last is short


def test_resume_after_interrupt_gives_the_uninterrupted_files_without_re_encoding(tmp_path, monkeypatch):
    path, lines = corpus(tmp_path)
    docs = Documents(text_cfg(tmp_path, path))
    prepare(docs, ByteTokenizer(), tmp_path / "whole", workers=1, shard_tokens=150)

    def interrupt(split, done):
        if done == 2:
            raise KeyboardInterrupt

    out = tmp_path / "cut"
    with pytest.raises(KeyboardInterrupt):
        prepare(docs, ByteTokenizer(), out, workers=1, shard_tokens=150, on_shard=interrupt)
    partial = json.loads((out / "index.json").read_text())
    assert not partial["complete"] and len(partial["splits"]["train"]["shards"]) == 2
    assert not list(out.glob(".*tmp"))  # the shard being written was dropped, not left half-done
    (out / ".train-00002.bin.tmp").write_bytes(b"junk")  # as a kill -9 would leave it
    encoded = []
    real = ByteTokenizer.encode_batch
    monkeypatch.setattr(ByteTokenizer, "encode_batch", lambda self, t: encoded.extend(t) or real(self, t))
    index = prepare(docs, ByteTokenizer(), out, workers=1, shard_tokens=150)
    assert index["complete"] and files(out) == files(tmp_path / "whole")
    assert index == read_index(tmp_path / "whole")
    assert len(encoded) == 120 - partial["splits"]["train"]["documents"]  # finished shards were kept
    assert not list(out.glob(".*tmp"))


def test_a_shard_of_the_wrong_size_restarts_from_scratch(tmp_path):
    path, _ = corpus(tmp_path, n=40)
    docs = Documents(text_cfg(tmp_path, path))
    prepare(docs, ByteTokenizer(), tmp_path / "a", workers=1, shard_tokens=100)
    shard = tmp_path / "a" / "train-00001.bin"
    good = files(tmp_path / "a")
    shard.write_bytes(shard.read_bytes()[:-2])
    assert read_index(tmp_path / "a") is None
    prepare(docs, ByteTokenizer(), tmp_path / "a", workers=2, shard_tokens=100)
    assert files(tmp_path / "a") == good


def test_sharded_blocks_equal_blocks_of_one_contiguous_file(tmp_path):
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, 60000, 1000).astype(np.uint16)
    tokens.tofile(tmp_path / "all.bin")
    cuts = [0, 13, 13, 400, 411, 999, 1000]  # includes an empty shard and a one-token shard
    paths = []
    for k, (a, b) in enumerate(zip(cuts, cuts[1:])):
        paths.append(tmp_path / f"s{k}.bin")
        tokens[a:b].tofile(paths[-1])
    one = TokenBlocks(tmp_path / "all.bin", 10, np.uint16, seed=3)
    sharded = TokenBlocks(paths, 10, np.uint16, seed=3)
    assert len(sharded) == len(one) == 90
    for step in (0, 1, 7, 30):  # several epochs: blocks straddling every cut are served
        for a, b in zip(one.get_batch(step, 8), sharded.get_batch(step, 8)):
            assert (a == b).all()
    for (xa, ya), (xb, yb) in zip(one.iter_eval(7), sharded.iter_eval(7)):
        assert (xa == xb).all() and (ya == yb).all()
    assert sharded.tokens.read(0, 1000).tolist() == tokens.tolist()
    assert sharded.tokens.read(405, 10).tolist() == tokens[405:415].tolist()
    with pytest.raises(IndexError):
        sharded.tokens.read(995, 6)


def test_uint32_shards_for_a_vocabulary_beyond_uint16(tmp_path):
    assert token_dtype(65535) == np.uint16 and token_dtype(65536) == np.uint32
    vocab = {f"w{i}": i for i in range(70000)}
    spec = {"version": "1.0", "added_tokens": [], "normalizer": None, "post_processor": None, "decoder": None,
            "pre_tokenizer": {"type": "WhitespaceSplit"},
            "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "w0"}}
    tok = HFTokenizer(json.dumps(spec))
    assert tok.vocab_size == 70000
    lines = [f"w{69999 - i} w{i * 1000}" for i in range(30)]
    path = tmp_path / "big.txt"
    path.write_text("\n".join(lines) + "\n")
    docs = Documents(text_cfg(tmp_path, path))
    for w in (1, 2):
        index = prepare(docs, tok, tmp_path / f"o{w}", workers=w, shard_tokens=10)
        assert index["dtype"] == "uint32"
    assert files(tmp_path / "o1") == files(tmp_path / "o2")
    want = [int(w[1:]) for line in lines[:27] for w in line.split()]  # WordLevel ids are the numbers
    assert split_tokens(tmp_path / "o1", "train", np.uint32).tolist() == want
    assert max(want) > 65535


def test_splits_are_fixed_by_the_config(tmp_path, monkeypatch):
    path, lines = corpus(tmp_path, n=50)
    val_path, val_lines = corpus(tmp_path, n=9, name="v.txt")
    train, val = load_documents(text_cfg(tmp_path, path, val_fraction=0.2))
    assert (train, val) == (lines[:40], lines[40:])
    train, val = load_documents(text_cfg(tmp_path, path, val_path=str(val_path)))
    assert (train, val) == (lines, val_lines)
    monkeypatch.setattr(stream_mod, "random_games", lambda n, *a, **k: [f"game {i}" for i in range(n)])
    chess = DataConfig(source="chess_random", num_games=30, val_fraction=0.2, cache_dir=str(tmp_path / "c"))
    pairs = list(Documents(chess).pairs())
    assert [g for _, g in pairs] == [f"game {i}" for i in range(30)]
    val_idx = set(np.random.default_rng([chess.seed, 7]).permutation(30)[:6].tolist())  # the seeded rule
    assert [s for s, _ in pairs] == ["val" if i in val_idx else "train" for i in range(30)]
    assert list(Documents(chess).pairs()) == pairs


def test_line_counting_matches_the_stream(tmp_path):
    cfg = text_cfg(tmp_path, tmp_path)
    for name, raw in (("a.txt", b"x\ny\n\nz"), ("b.txt", b"x\r\ny\rz\n"), ("c.txt", b"one\n")):
        (tmp_path / name).write_bytes(raw)
        n = count_text_documents(cfg, str(tmp_path / name))
        assert n == len(list(iter_text_documents(cfg, str(tmp_path / name)))) == {"a": 4, "b": 3, "c": 1}[name[0]]
    assert count_text_documents(cfg, str(tmp_path)) == 8  # a directory: its files in name order


def test_jsonl_documents_and_errors_name_file_and_line(tmp_path):
    good = tmp_path / "d.jsonl"
    good.write_text('{"text": "first doc", "id": 1}\n\n{"text": "second\\ndoc"}\n')
    cfg = text_cfg(tmp_path, good)
    assert list(iter_text_documents(cfg, str(good))) == ["first doc", "second\ndoc"]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"text": broken}\n')
    with pytest.raises(DataError, match=re.escape(f"{bad}:2: not a JSON record")):
        list(iter_text_documents(cfg, str(bad)))
    bad.write_text('{"text": "ok"}\n{"body": "x"}\n')
    with pytest.raises(DataError, match=re.escape(f"{bad}:2: no text field 'text'") + r".*\['body'\]"):
        list(iter_text_documents(cfg, str(bad)))


def test_bad_utf8_deep_in_a_file_names_its_line(tmp_path):
    path = tmp_path / "late.txt"
    path.write_bytes(b"fine line\n" * 9000 + b"caf\xe9\n" + b"more\n")  # past check_text_file's 64 KiB probe
    cfg = text_cfg(tmp_path, path, num_workers=1)
    with pytest.raises(DataError, match=re.escape(f"{path}:9001: not UTF-8 text") + r".*xe9"):
        build_data(cfg, 8, progress=False)


def test_cli_prepare_then_train_data_is_a_cache_hit(tmp_path, capsys):
    path, lines = corpus(tmp_path, n=300)
    over = [f"data.path={path}", "data.tokenizer=byte", f"data.cache_dir={tmp_path / 'cache'}",
            "data.num_workers=2", "data.shard_tokens=500", f"train.out_dir={tmp_path / 'runs'}", "train.run_name=r"]
    assert main(["prepare", "shakespeare-char-dense", *over]) == 0
    out = capsys.readouterr().out
    assert "workers 2" in out and re.search(r"prepared .* in [\d.]+ s \([\d,]+ tokens/s\)", out)
    assert re.search(r"train +270 documents .* tokens +\d+ shards", out)
    assert (tmp_path / "runs" / "r" / "tokenizer" / "tokenizer.json").is_file()
    assert main(["prepare", "shakespeare-char-dense", *over]) == 0
    assert "already prepared" in capsys.readouterr().out
    from moex import config as C

    cfg = C.load("shakespeare-char-dense", over)
    bundle = build_data(cfg.data, 16, tmp_path / "runs" / "r" / "tokenizer", progress=False)
    assert bundle.info["cache_hit"] and bundle.info["train"]["shards"] > 1
    tokens = bundle.train.tokens.read(0, bundle.train.n_tokens)
    assert tokens.tolist() == reference(ByteTokenizer(), lines[:270])


def test_cli_prepare_bad_input_is_one_line(tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "a"}\nnot json\n')
    rc = main(["prepare", "shakespeare-char-dense", f"data.path={bad}", f"data.cache_dir={tmp_path / 'c'}",
               f"train.out_dir={tmp_path / 'runs'}", "data.shard_tokens=0"])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("moex: error: data.shard_tokens") and err.count("\n") == 1
    rc = main(["prepare", "shakespeare-char-dense", f"data.path={bad}", f"data.cache_dir={tmp_path / 'c'}",
               f"train.out_dir={tmp_path / 'runs'}"])
    err = capsys.readouterr().err
    assert rc == 2 and err == f"moex: error: {bad}:2: not a JSON record (Expecting value, column 1)\n"
