"""Chess games as move strings: PGN reading, random legal games, the MoE-X string format.

Format (MoE-X / Karvonen): `;1.e4 e5 2.Nf3 Nc6 ...` -- `;` first, no space after
the move number's dot, one space between tokens, SAN with `+ # =Q O-O`, no
result, no comments; truncated to `max_chars` characters (0 = no limit).
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import random
from pathlib import Path
from typing import Iterable, Iterator

import chess
import chess.pgn

from moex.data.errors import DataError


def format_sans(sans: Iterable[str], max_chars: int = 0) -> str:
    """Join SAN moves of a game from the standard start into `;1.e4 e5 2.Nf3 ...`."""
    parts = [";"]
    for ply, san in enumerate(sans):
        if ply % 2 == 0:
            parts.append(f"{' ' if ply else ''}{ply // 2 + 1}.{san}")
        else:
            parts.append(f" {san}")
    text = "".join(parts)
    return text[:max_chars] if max_chars > 0 else text


def game_to_string(game_or_moves: chess.pgn.Game | Iterable[chess.Move | str], max_chars: int = 0) -> str:
    """A game (python-chess `Game`, or moves/SAN strings from the standard start) as a move string.

    Moves are replayed, so SAN comes out canonical (check marks, disambiguation)
    and an illegal move raises `DataError`.
    """
    if isinstance(game_or_moves, chess.pgn.Game):
        board = game_or_moves.board()
        if board.fen() != chess.STARTING_FEN:
            raise DataError("game_to_string: only games from the standard starting position are supported")
        moves: Iterable[chess.Move | str] = game_or_moves.mainline_moves()
    else:
        board, moves = chess.Board(), game_or_moves
    sans = []
    for ply, move in enumerate(moves):
        try:
            if isinstance(move, str):
                move = board.parse_san(move)
            elif move not in board.legal_moves:
                raise chess.IllegalMoveError(f"illegal move {move.uci()} in {board.fen()}")
        except ValueError as e:
            raise DataError(f"game_to_string: ply {ply + 1}: {e}") from None
        sans.append(board.san_and_push(move))
    return format_sans(sans, max_chars)


# --------------------------------------------------------------------------- PGN


class _LineCountingReader:
    """Wraps a text stream; remembers the line number where the current game starts."""

    def __init__(self, handle):
        self._handle = handle
        self.line_no = 0
        self.game_start = 0

    def begin_game(self) -> None:
        self.game_start = 0

    def readline(self) -> str:
        line = self._handle.readline()
        if line:
            self.line_no += 1
            if not self.game_start and not line.isspace() and not line.startswith(("%", ";")):
                self.game_start = self.line_no
        return line


class _SanCollector(chess.pgn.BaseVisitor):
    """Visitor collecting the mainline as canonical SAN, without building a game tree."""

    def begin_game(self):
        self.sans: list[str] = []
        self.errors: list[Exception] = []
        self.nonstandard_start = False
        self._depth = 0

    def visit_board(self, board):
        if not board.move_stack and board.fen() != chess.STARTING_FEN:
            self.nonstandard_start = True

    def begin_variation(self):
        return chess.pgn.SKIP  # variations are not part of the game string

    def visit_move(self, board, move):
        self.sans.append(board.san(move))

    def handle_error(self, error):
        self.errors.append(error)

    def result(self):
        return self


def iter_pgn(path: str | Path, max_games: int = 0, max_chars: int = 0) -> Iterator[str]:
    """Stream the games of a PGN file as move strings (the first `max_games`; 0 = all).

    A game with an illegal or unparsable move, or a non-standard start, raises
    `DataError` naming the file and the line where that game starts.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"PGN file not found: {path}")
    count = 0
    with open(path, encoding="utf-8", errors="replace") as f:
        reader = _LineCountingReader(f)
        while not max_games or count < max_games:
            reader.begin_game()
            game = chess.pgn.read_game(reader, Visitor=_SanCollector)
            if game is None:
                return
            where = f"{path}:{reader.game_start}"
            if game.errors:
                raise DataError(f"{where}: corrupt game (game {count + 1}): {game.errors[0]}")
            if game.nonstandard_start:
                raise DataError(f"{where}: game {count + 1} does not start from the standard position")
            if not game.sans:
                raise DataError(f"{where}: game {count + 1} has no moves")
            yield format_sans(game.sans, max_chars)
            count += 1


def read_pgn(path: str | Path, max_games: int = 0, max_chars: int = 0, *, cache_dir: str | Path | None = None
             ) -> list[str]:
    """The games of a PGN file as move strings; see `iter_pgn`.

    With `cache_dir`, the parsed strings are kept in a file keyed by the PGN's path,
    size and mtime and the arguments, so a second read (eval, interpret, another
    run on the same games) skips replaying every move with python-chess.
    """
    if cache_dir is None:
        return list(iter_pgn(path, max_games, max_chars))
    path = Path(path)
    if not path.is_file():
        raise DataError(f"PGN file not found: {path}")
    st = path.stat()
    key = hashlib.sha256(json.dumps([str(path.resolve()), st.st_size, st.st_mtime_ns, max_games, max_chars]).encode())
    cached = Path(cache_dir) / f"pgn-games-{key.hexdigest()[:20]}.txt"
    if cached.is_file():
        return cached.read_text().split("\n")[:-1]
    games = list(iter_pgn(path, max_games, max_chars))
    cached.parent.mkdir(parents=True, exist_ok=True)
    tmp = cached.with_name(f"{cached.name}.tmp-{os.getpid()}")
    tmp.write_text("".join(g + "\n" for g in games))  # game strings hold no newline
    os.replace(tmp, cached)  # atomic: a reader sees the whole file or none
    return games


# --------------------------------------------------------------------------- random games


def random_game(rng: random.Random, max_plies: int = 120, max_chars: int = 0) -> str:
    """One game of uniformly random legal moves, ending at mate, stalemate,
    insufficient material or `max_plies`."""
    board = chess.Board()
    sans = []
    for _ in range(max_plies):
        # Shuffle-then-test over pseudo-legal moves: the first legal one is uniform
        # over legal moves, and it skips a full legal-move generation per ply.
        moves = list(board.generate_pseudo_legal_moves())
        move = None
        while moves:
            i = rng.randrange(len(moves))
            moves[i], moves[-1] = moves[-1], moves[i]
            candidate = moves.pop()
            if board.is_legal(candidate):
                move = candidate
                break
        if move is None:  # checkmate or stalemate
            break
        sans.append(board.san_and_push(move))
        if board.is_insufficient_material():
            break
    return format_sans(sans, max_chars)


def _random_games_range(args: tuple[int, int, int, int, int]) -> list[str]:
    seed, start, stop, max_plies, max_chars = args
    return [random_game(random.Random(f"moex-chess-{seed}-{i}"), max_plies, max_chars) for i in range(start, stop)]


def random_games(
    n: int, seed: int, max_plies: int = 120, max_chars: int = 0, *, workers: int = 1, progress: bool = False
) -> list[str]:
    """`n` random legal games, deterministic for `seed` (game i depends only on seed and i,
    so the result is the same for any number of `workers` processes)."""
    if n < 0 or max_plies < 1 or workers < 1:
        raise ValueError(f"random_games: need n >= 0, max_plies >= 1, workers >= 1; got {n}, {max_plies}, {workers}")
    chunk = 100
    jobs = [(seed, a, min(a + chunk, n), max_plies, max_chars) for a in range(0, n, chunk)]
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=n, desc="random chess games", unit="game", leave=False)
    games: list[str] = []
    if workers == 1 or len(jobs) == 1:
        results: Iterable[list[str]] = map(_random_games_range, jobs)
        for part in results:
            games.extend(part)
            bar and bar.update(len(part))
    else:
        # fork: the children only run python-chess, and unlike spawn it does not
        # re-import the caller's __main__ (which may be an unguarded script)
        methods = multiprocessing.get_all_start_methods()
        ctx = multiprocessing.get_context("fork" if "fork" in methods else "spawn")
        with ctx.Pool(workers) as pool:
            for part in pool.imap(_random_games_range, jobs):
                games.extend(part)
                bar and bar.update(len(part))
    if bar:
        bar.close()
    return games
