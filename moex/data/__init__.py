"""Data pipeline: tokenizers, chess games and text sources, packed token blocks.

Entry point: `build_data(cfg.data, block_size, tokenizer_dir) -> DataBundle`.
"""

from moex.data.build import DataBundle, build_data, cache_key, load_documents
from moex.data.chess_games import game_to_string, iter_pgn, random_games, read_pgn
from moex.data.errors import DataError
from moex.data.packing import TokenBlocks
from moex.data.tokenizers import (
    CHESS_CHARS,
    ByteTokenizer,
    CharTokenizer,
    ChessTokenizer,
    SentencePieceTokenizer,
    Tokenizer,
    build_tokenizer,
    load_tokenizer,
)

__all__ = [
    "CHESS_CHARS",
    "ByteTokenizer",
    "CharTokenizer",
    "ChessTokenizer",
    "DataBundle",
    "DataError",
    "SentencePieceTokenizer",
    "TokenBlocks",
    "Tokenizer",
    "build_data",
    "build_tokenizer",
    "cache_key",
    "game_to_string",
    "iter_pgn",
    "load_documents",
    "load_tokenizer",
    "random_games",
    "read_pgn",
]
