"""Tokenizers with one interface: encode/decode/vocab_size/save, restored by `load_tokenizer`.

Each saved tokenizer is a directory with a `tokenizer.json` naming its kind
(sentencepiece also writes `tokenizer.model` next to it).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from pathlib import Path
from typing import Iterable

import numpy as np

from moex.data.errors import DataError

TOKENIZER_FILE = "tokenizer.json"
SP_MODEL_FILE = "tokenizer.model"

# The 32 characters of the MoE-X / Karvonen chess move strings, in ASCII order.
CHESS_CHARS = " #+-.0123456789;=BKNOQRabcdefghx"
assert len(CHESS_CHARS) == 32


class Tokenizer:
    """Base class: subclasses set `kind`, `vocab_size` and implement encode/decode."""

    kind: str = ""
    vocab_size: int = 0

    def encode(self, text: str) -> list[int]:
        raise NotImplementedError

    def decode(self, ids: Iterable[int]) -> str:
        raise NotImplementedError

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [self.encode(t) for t in texts]

    def _state(self) -> dict:
        return {}

    def identity(self) -> str:
        """A short stable string that changes whenever the token mapping changes."""
        blob = json.dumps({"kind": self.kind, **self._state()}, sort_keys=True).encode()
        return f"{self.kind}-{hashlib.sha256(blob).hexdigest()[:16]}"

    def save(self, directory: str | Path) -> Path:
        """Write `tokenizer.json` (and any model file) into `directory`; return the json path."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        path = directory / TOKENIZER_FILE
        path.write_text(json.dumps({"kind": self.kind, "vocab_size": self.vocab_size, **self._state()}, indent=1))
        return path


class _TableTokenizer(Tokenizer):
    """A fixed character <-> id table."""

    def __init__(self, chars: str):
        if len(set(chars)) != len(chars):
            raise DataError("tokenizer characters must be unique")
        self.chars = chars
        self.vocab_size = len(chars)
        self._stoi = {c: i for i, c in enumerate(chars)}

    def encode(self, text: str) -> list[int]:
        stoi = self._stoi
        try:
            return [stoi[c] for c in text]
        except KeyError:
            bad = next(c for c in text if c not in stoi)
            raise DataError(
                f"{self.kind} tokenizer: character {bad!r} (U+{ord(bad):04X}) at position {text.index(bad)} "
                f"is not in its {self.vocab_size}-character vocabulary"
            ) from None

    def decode(self, ids: Iterable[int]) -> str:
        chars = self.chars
        out = []
        for i in ids:
            i = int(i)
            if not 0 <= i < self.vocab_size:
                raise DataError(f"{self.kind} tokenizer: id {i} out of range [0, {self.vocab_size})")
            out.append(chars[i])
        return "".join(out)


class ChessTokenizer(_TableTokenizer):
    """The 32-character vocabulary of chess move strings (`;1.e4 e5 2.Nf3 ...`)."""

    kind = "chess"

    def __init__(self):
        super().__init__(CHESS_CHARS)


class CharTokenizer(_TableTokenizer):
    """One id per character seen in the text it was built from (sorted)."""

    kind = "char"

    @classmethod
    def train(cls, texts: Iterable[str]) -> "CharTokenizer":
        seen: set[str] = set()
        for t in texts:
            seen.update(t)
        if not seen:
            raise DataError("char tokenizer: no text to build the vocabulary from")
        return cls("".join(sorted(seen)))

    def _state(self) -> dict:
        return {"chars": self.chars}


class ByteTokenizer(Tokenizer):
    """UTF-8 bytes, 256 ids. Decoding replaces invalid UTF-8 sequences."""

    kind = "byte"
    vocab_size = 256

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: Iterable[int]) -> str:
        try:
            return bytes(int(i) for i in ids).decode("utf-8", errors="replace")
        except ValueError:
            raise DataError("byte tokenizer: ids must lie in [0, 256)") from None


class SentencePieceTokenizer(Tokenizer):
    """A sentencepiece BPE model; lossless (identity normalisation, byte fallback, `\\n` a symbol)."""

    kind = "sentencepiece"

    def __init__(self, model_proto: bytes):
        import sentencepiece as spm

        self.model_proto = bytes(model_proto)
        self._sp = spm.SentencePieceProcessor(model_proto=self.model_proto)
        self.vocab_size = int(self._sp.get_piece_size())

    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int, *, model_type: str = "bpe",
              num_threads: int = 0) -> "SentencePieceTokenizer":
        """Train on `texts` (one document or line each). `vocab_size` is an upper bound on tiny corpora."""
        import sentencepiece as spm

        if vocab_size < 300:
            raise DataError(f"sentencepiece vocab_size={vocab_size} is too small: byte fallback needs at least 300")
        model = io.BytesIO()
        spm.SentencePieceTrainer.train(
            sentence_iterator=(t for t in texts if t),
            model_writer=model,
            vocab_size=vocab_size,
            model_type=model_type,
            hard_vocab_limit=False,  # tiny corpora may not fill the vocabulary
            byte_fallback=True,  # any character encodes, so decode(encode(s)) == s
            normalization_rule_name="identity",
            remove_extra_whitespaces=False,
            add_dummy_prefix=False,  # documents are concatenated; no space added per document
            user_defined_symbols=["\n"],
            input_sentence_size=2_000_000,
            shuffle_input_sentence=True,
            num_threads=num_threads or os.cpu_count() or 1,  # 0 = every core
            minloglevel=2,
        )
        return cls(model.getvalue())

    def encode(self, text: str) -> list[int]:
        return self._sp.encode(text)

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return self._sp.encode(texts)

    def decode(self, ids: Iterable[int]) -> str:
        return self._sp.decode([int(i) for i in ids])

    def identity(self) -> str:
        return f"{self.kind}-{hashlib.sha256(self.model_proto).hexdigest()[:16]}"

    def save(self, directory: str | Path) -> Path:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        (directory / SP_MODEL_FILE).write_bytes(self.model_proto)
        path = directory / TOKENIZER_FILE
        path.write_text(json.dumps({"kind": self.kind, "vocab_size": self.vocab_size, "model_file": SP_MODEL_FILE}))
        return path


class HFTokenizer(Tokenizer):
    """A Hugging Face `tokenizers` tokenizer (an imported model's), from its `tokenizer.json`.

    Text is encoded without special tokens (no BOS/EOS added), as moex packs documents itself.
    """

    kind = "hf"
    MODEL_FILE = "hf_tokenizer.json"

    def __init__(self, json_text: str):
        from tokenizers import Tokenizer as _Tok

        self.json_text = json_text
        self._tok = _Tok.from_str(json_text)
        self.vocab_size = int(self._tok.get_vocab_size(with_added_tokens=True))

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self._tok.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids: Iterable[int]) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=False)

    def identity(self) -> str:
        return f"{self.kind}-{hashlib.sha256(self.json_text.encode()).hexdigest()[:16]}"

    def save(self, directory: str | Path) -> Path:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        (directory / self.MODEL_FILE).write_text(self.json_text)
        path = directory / TOKENIZER_FILE
        path.write_text(json.dumps({"kind": self.kind, "vocab_size": self.vocab_size, "model_file": self.MODEL_FILE}))
        return path


def has_saved_tokenizer(directory: str | Path | None) -> bool:
    return directory is not None and (Path(directory) / TOKENIZER_FILE).is_file()


def load_tokenizer(directory: str | Path) -> Tokenizer:
    """Restore the tokenizer saved in `directory` by `Tokenizer.save`, whatever its kind."""
    path = Path(directory) / TOKENIZER_FILE
    if not path.is_file():
        raise DataError(f"no saved tokenizer: {path} does not exist")
    try:
        meta = json.loads(path.read_text())
        kind = meta["kind"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise DataError(f"{path}: not a tokenizer file ({e})") from None
    if kind == "chess":
        return ChessTokenizer()
    if kind == "byte":
        return ByteTokenizer()
    if kind == "char":
        return CharTokenizer(meta["chars"])
    if kind == "sentencepiece":
        model_path = Path(directory) / meta.get("model_file", SP_MODEL_FILE)
        if not model_path.is_file():
            raise DataError(f"{path}: sentencepiece model file {model_path} is missing")
        return SentencePieceTokenizer(model_path.read_bytes())
    if kind == "hf":
        model_path = Path(directory) / meta.get("model_file", HFTokenizer.MODEL_FILE)
        if not model_path.is_file():
            raise DataError(f"{path}: Hugging Face tokenizer file {model_path} is missing")
        return HFTokenizer(model_path.read_text())
    raise DataError(f"{path}: unknown tokenizer kind {kind!r}; known: chess, byte, char, sentencepiece, hf")


def build_tokenizer(kind: str, texts: Iterable[str] | None = None, *, vocab_size: int = 8000,
                    num_threads: int = 0) -> Tokenizer:
    """A fresh tokenizer of `kind`; char and sentencepiece are trained on `texts` (0 threads = every core)."""
    if kind == "chess":
        return ChessTokenizer()
    if kind == "byte":
        return ByteTokenizer()
    if kind in ("char", "sentencepiece") and texts is None:
        raise DataError(f"a {kind} tokenizer needs training text")
    if kind == "char":
        return CharTokenizer.train(texts)
    if kind == "sentencepiece":
        return SentencePieceTokenizer.train(texts, vocab_size, num_threads=num_threads)
    if kind == "hf":
        raise DataError("data.tokenizer=hf is an imported model's tokenizer and cannot be built from text: "
                        "import the model with `moex import hf`, or set train.init_from to the imported run")
    raise DataError(f"unknown tokenizer {kind!r}; known: chess, byte, char, sentencepiece")


def token_dtype(vocab_size: int) -> np.dtype:
    """Smallest unsigned dtype that holds every id."""
    return np.dtype(np.uint16) if vocab_size <= 65535 else np.dtype(np.uint32)
