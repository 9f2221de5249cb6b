"""Data pipeline: tokenizers, chess games and text sources, packed token blocks.

Entry points: `build_data(cfg.data, block_size, tokenizer_dir) -> DataBundle` (prepares the
data when it is missing) and `prepare_data(cfg.data, tokenizer_dir)` (`moex prepare`).
"""

from moex.data.build import DataBundle, Prepared, build_data, cache_key, prepare_data
from moex.data.chess_games import game_to_string, iter_pgn, random_games, read_pgn
from moex.data.errors import DataError
from moex.data.packing import ShardedTokens, TokenBlocks
from moex.data.stream import Documents, load_documents
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
    "Documents",
    "Prepared",
    "SentencePieceTokenizer",
    "ShardedTokens",
    "TokenBlocks",
    "Tokenizer",
    "build_data",
    "build_tokenizer",
    "cache_key",
    "game_to_string",
    "iter_pgn",
    "load_documents",
    "load_tokenizer",
    "prepare_data",
    "random_games",
    "read_pgn",
]
