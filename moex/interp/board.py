"""Board-state properties at the `.` of each move number of a chess game string.

Shape key: P probed positions, Q properties, S 64 squares (a1=0 … h8=63),
C 12 piece classes `PNBRQKpnbrqk` (white then black).

The string is the Karvonen/MoE-X format `;1.e4 e5 2.Nf3 …` (possibly truncated
mid-move). At each `.` — only the first 20 per game — the board is the one after
every move that precedes that `.` in the string; it is always white to move.

Properties form a registry. `@register_property("name", labels)` on a function
`board -> bool array of len(labels)` adds a group; that is all a new property
needs. Groups derived from piece placement are registered with `batched=True`
and compute on the (P, S, C) piece tensor of all positions at once.

The headline group `piece_masked` is the "masked blank and initial state" set:
64 squares x 12 classes, where empty squares are not properties and a piece
standing on its own starting square does not count as a positive.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import chess
import numpy as np

MAX_DOTS = 20
CLASSES = "PNBRQKpnbrqk"
SQUARES = [chess.square_name(s) for s in range(64)]
COLORS_TYPES = [(c, t) for c in (chess.WHITE, chess.BLACK) for t in chess.PIECE_TYPES]  # CLASSES order


@dataclass(frozen=True)
class Property:
    labels: list[str]
    fn: Callable
    batched: bool  # fn(pieces_PSC, boards) -> (P, n) instead of fn(board) -> (n,)


PROPERTIES: dict[str, Property] = {}


def register_property(name: str, labels: list[str], *, batched: bool = False):
    """Register a property group. `fn(board) -> bool array of len(labels)`;
    with `batched=True`, `fn(pieces_PSC, boards) -> (P, len(labels)) bool`."""

    def deco(fn):
        if name in PROPERTIES:
            raise ValueError(f"property group {name!r} registered twice")
        PROPERTIES[name] = Property(list(labels), fn, batched)
        return fn

    return deco


def pieces_PSC(boards: list[chess.Board]) -> np.ndarray:
    """(P, 64, 12) bool: class c stands on square s, from the boards' bitboards in one unpack."""
    bb_PC = np.array([[b.pieces_mask(t, c) for c, t in COLORS_TYPES] for b in boards], dtype=np.uint64)
    bb_PC = bb_PC.reshape(len(boards), 12)
    # little-endian bytes + little bit order: bit s of the bitboard lands at index s
    bits_PCS = np.unpackbits(bb_PC.view(np.uint8).reshape(len(boards), 12, 8), axis=-1, bitorder="little")
    return bits_PCS.transpose(0, 2, 1).astype(bool)


INITIAL_SC = pieces_PSC([chess.Board()])[0]  # the starting position's placement
PIECE_LABELS = [f"{s}:{c}" for s in SQUARES for c in CLASSES]


@register_property("piece", PIECE_LABELS, batched=True)
def piece(pieces, boards):
    return pieces.reshape(len(pieces), -1)


@register_property("piece_masked", PIECE_LABELS, batched=True)
def piece_masked(pieces, boards):
    return (pieces & ~INITIAL_SC[None]).reshape(len(pieces), -1)


@register_property("empty", [f"{s}:empty" for s in SQUARES], batched=True)
def empty(pieces, boards):
    return ~pieces.any(-1)


VALUES_C = np.array([1, 3, 3, 5, 9, 0] * 2) * np.repeat([1, -1], 6)  # signed white-minus-black value
MATERIAL_BINS = ["<=-3", "-2..-1", "0", "1..2", ">=3"]


@register_property("material", [f"material:{b}" for b in MATERIAL_BINS], batched=True)
def material(pieces, boards):
    diff_P = pieces.sum(1) @ VALUES_C
    bin_P = np.digitize(diff_P, [-2, 0, 1, 3])  # edges: <=-3 | -2..-1 | 0 | 1..2 | >=3
    return np.arange(5)[None, :] == bin_P[:, None]


@register_property("side_to_move", ["white_to_move"])
def side_to_move(board):
    return np.array([board.turn == chess.WHITE])


@register_property("castling", ["white_kingside", "white_queenside", "black_kingside", "black_queenside"])
def castling(board):
    return np.array([board.has_kingside_castling_rights(chess.WHITE), board.has_queenside_castling_rights(chess.WHITE),
                     board.has_kingside_castling_rights(chess.BLACK), board.has_queenside_castling_rights(chess.BLACK)])


@register_property("en_passant", ["en_passant_available"])
def en_passant(board):
    return np.array([board.has_legal_en_passant()])


@register_property("check", ["in_check"])
def check(board):
    return np.array([board.is_check()])


def boards_at_dots(game: str, max_dots: int = MAX_DOTS) -> list[tuple[int, chess.Board]]:
    """(char position of the `.`, board after every preceding move) for the first `max_dots` dots."""
    board = chess.Board()
    out = []
    i, n = 0, len(game)
    while i < n and len(out) < max_dots:
        ch = game[i]
        if ch == ".":
            out.append((i, board.copy(stack=False)))
            i += 1
        elif ch in " ;" or ch.isdigit():  # SAN never starts with a digit
            i += 1
        else:
            j = game.find(" ", i)
            if j == -1:
                break  # the last token may be truncated; no later dot needs it
            try:
                board.push_san(game[i:j])
            except ValueError as e:
                raise ValueError(f"illegal move {game[i:j]!r} at character {i} of {game[:60]!r}…") from e
            i = j
    return out


def group_slices(groups: list[str]) -> tuple[list[str], dict[str, slice]]:
    """Property names `group/label` and each group's column slice, in `groups` order."""
    unknown = [g for g in groups if g not in PROPERTIES]
    if unknown:
        raise KeyError(f"unknown property groups {unknown}; valid: {sorted(PROPERTIES)}")
    names, slices, start = [], {}, 0
    for g in groups:
        labels = PROPERTIES[g].labels
        names += [f"{g}/{l}" for l in labels]
        slices[g] = slice(start, start + len(labels))
        start += len(labels)
    return names, slices


def labels_for_boards(boards: list[chess.Board], groups: list[str]) -> np.ndarray:
    """labels_PQ (bool) of the given groups for each board."""
    pieces = pieces_PSC(boards) if boards else np.zeros((0, 64, 12), bool)
    cols = []
    for g in groups:
        prop = PROPERTIES[g]
        if prop.batched:
            cols.append(np.asarray(prop.fn(pieces, boards), dtype=bool).reshape(len(boards), len(prop.labels)))
        else:
            rows = [prop.fn(b) for b in boards]
            cols.append(np.array(rows, dtype=bool).reshape(len(boards), len(prop.labels)))
    return np.concatenate(cols, 1) if cols else np.zeros((len(boards), 0), bool)


def labels_for_games(games: list[str], groups: list[str] | None = None, max_dots: int = MAX_DOTS):
    """Label every probed position (`.`) of every game.

    Returns (game_idx_P, char_pos_P, labels_PQ bool, names_Q, slices) where
    `slices[group]` is the column slice of that group in labels_PQ and names are
    `group/label`. Rows are ordered by game, then position.
    """
    groups = list(PROPERTIES) if groups is None else list(groups)
    names, slices = group_slices(groups)
    game_P, pos_P, boards = [], [], []
    for gi, game in enumerate(games):
        for pos, board in boards_at_dots(game, max_dots):
            game_P.append(gi)
            pos_P.append(pos)
            boards.append(board)
    labels_PQ = labels_for_boards(boards, groups)
    return np.array(game_P, dtype=np.int64), np.array(pos_P, dtype=np.int64), labels_PQ, names, slices
