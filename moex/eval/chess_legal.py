"""`moex eval RUN --suite chess-legal`: how often a chess LM's sampled moves are legal.

Games are never training games: for a run trained on a PGN, its own validation
split; otherwise real games from `--pgn` (default chess/games.pgn under the data
root). Three measures, all from the model's *sampled* moves (temperature 1):

- legal-move rate: at `positions` random plies of each game, the prompt is the
  game's move string up to that ply (ending in `N.` when White is to move); the
  model writes characters up to the next space, and the move counts as legal
  when python-chess parses it as a legal SAN move in that position.
- continuation: from each game's first `opening_plies` plies the model plays
  both sides; the number of consecutive legal plies it writes (at most 40) gives
  the fraction of games it continues for 20 and for 40 plies (half-moves).
- optionally, games against a UCI engine (e.g. Debian's stockfish): the model is
  White, gets 3 samples per move, and forfeits when none is legal.
"""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path
from typing import Callable

import chess

from moex.data.chess_games import format_sans

MAX_MOVE_CHARS = 10  # longest SAN is 7 ("Qh4xe1+"); a model that never writes a space stops here
Sampler = Callable[[str], str]  # prompt -> the text the model writes for the next move


def parse_game(text: str) -> list[str]:
    """SAN moves of a `;1.e4 e5 2.Nf3 ...` string, replayed from the start; stops at the first
    token that is not a legal move (a game string truncated mid-move ends there)."""
    board, sans = chess.Board(), []
    for tok in text.lstrip(";").split():
        san = tok.split(".", 1)[1] if "." in tok else tok
        move = legal_move(board, san)
        if move is None:
            break
        sans.append(san)
        board.push(move)
    return sans


def legal_move(board: chess.Board, san: str) -> chess.Move | None:
    """The move `san` denotes if it is legal on `board`, else None (null moves are never legal)."""
    try:
        move = board.parse_san(san)
    except ValueError:  # illegal, ambiguous or not SAN at all
        return None
    return move if move and board.is_legal(move) else None


def prompt_for(sans: list[str]) -> str:
    """The move string after `sans`, ready for the next move (`;1.e4 e5 2.` or `;1.e4 `)."""
    text = format_sans(sans) + (" " if sans else "")
    return text + (f"{len(sans) // 2 + 1}." if len(sans) % 2 == 0 else "")


def model_sampler(model, tokenizer, *, seed: int = 0, temperature: float = 1.0) -> Sampler:
    """A sampler drawing from `model` with a KV cache, seeded once for the whole suite."""
    import torch

    from moex.models.sampling import generate

    gen = torch.Generator().manual_seed(seed)
    space = tokenizer.encode(" ")[0]

    def sample(prompt: str) -> str:
        ids = torch.tensor([tokenizer.encode(prompt)], dtype=torch.long)
        out = generate(model, ids, MAX_MOVE_CHARS, temperature=temperature, generator=gen,
                       stop=lambda idx: int(idx[0, -1]) == space)
        return tokenizer.decode(out[0, ids.size(1) :].tolist()).split(" ")[0]

    return sample


def legal_rate(games: list[list[str]], sample: Sampler, *, positions: int, rng: random.Random) -> dict:
    """Fraction of legal sampled moves at `positions` random plies per game."""
    legal = total = 0
    for sans in games:
        plies = sorted(rng.sample(range(len(sans)), min(positions, len(sans))))
        board, pushed = chess.Board(), 0
        for p in plies:
            while pushed < p:
                board.push_san(sans[pushed])
                pushed += 1
            legal += legal_move(board, sample(prompt_for(sans[:p]))) is not None
            total += 1
    return {"legal_moves": legal, "positions": total, "legal_rate": legal / max(1, total)}


def continuation(games: list[list[str]], sample: Sampler, *, opening_plies: int, max_plies: int = 40) -> dict:
    """Consecutive legal plies the model writes after each game's opening, playing both sides."""
    lengths = []
    for sans in games:
        moves, board = list(sans[:opening_plies]), chess.Board()
        for san in moves:
            board.push_san(san)
        n = 0
        while n < max_plies and not board.is_game_over():
            move = legal_move(board, sample(prompt_for(moves)))
            if move is None:
                break
            moves.append(board.san(move))
            board.push(move)
            n += 1
        lengths.append(n if not board.is_game_over() else max_plies)  # a finished game counts as continued
    g = max(1, len(lengths))
    return {"games": len(lengths), "mean_legal_plies": sum(lengths) / g,
            "continue_20": sum(n >= 20 for n in lengths) / g, "continue_40": sum(n >= 40 for n in lengths) / g}


def play_engine(sample: Sampler, engine_cmd: str, *, games: int, tries: int = 3, max_plies: int = 200,
                think_s: float = 0.01) -> dict:
    """W/D/L of the model (White) against a UCI engine; no legal move in `tries` samples forfeits."""
    import shutil

    import chess.engine

    # Debian installs stockfish under /usr/games, which is not on every PATH
    exe = shutil.which(engine_cmd) or shutil.which(engine_cmd, path="/usr/games") or engine_cmd
    try:
        engine = chess.engine.SimpleEngine.popen_uci(exe, timeout=120)  # a loaded machine starts it slowly
    except (FileNotFoundError, chess.engine.EngineError) as e:
        raise ValueError(f"--engine {engine_cmd!r} could not be started ({e}); "
                         "install one (Debian: apt-get install stockfish) or leave --engine out") from None
    res = {"win": 0, "draw": 0, "loss": 0, "forfeits": 0}
    try:
        for _ in range(games):
            board, sans, forfeit = chess.Board(), [], False
            while not board.is_game_over() and len(sans) < max_plies:
                if board.turn == chess.WHITE:
                    move = next((m for m in (legal_move(board, sample(prompt_for(sans))) for _ in range(tries)) if m),
                                None)
                    if move is None:
                        forfeit = True
                        break
                else:
                    move = engine.play(board, chess.engine.Limit(time=think_s)).move
                sans.append(board.san(move))
                board.push(move)
            outcome = board.outcome()
            if forfeit:
                res["forfeits"] += 1
                res["loss"] += 1
            elif outcome is None or outcome.winner is None:
                res["draw"] += 1  # includes the move limit
            else:
                res["win" if outcome.winner == chess.WHITE else "loss"] += 1
    finally:
        engine.quit()
    return res


def _games(loaded, pgn: str | None, n_games: int) -> tuple[list[list[str]], str]:
    from moex.data import load_documents, read_pgn
    from moex.data.sources import resolve_path

    cfg = loaded.cfg
    if cfg.data.source == "pgn" and pgn is None:
        texts, origin = load_documents(cfg.data)[1], f"validation split of {cfg.data.path} (never trained on)"
    else:
        resolved = resolve_path(cfg.data, pgn or "chess/games.pgn")
        texts, origin = read_pgn(resolved, max_games=n_games), str(resolved)
    games = [g for g in (parse_game(t) for t in texts[:n_games]) if g]
    if not games:
        raise ValueError(f"no games with legal moves in {origin}")
    return games, origin


def run(args) -> int:
    """The `moex eval --suite chess-legal` command."""
    from moex.data import load_tokenizer
    from moex.checkpoint.load import load_model

    try:
        if args.games < 1:
            raise ValueError(f"--games must be >= 1, got {args.games}")
        loaded = load_model(args.path)
        tok = load_tokenizer(loaded.run_dir / "tokenizer")
        if tok.kind != "chess":
            raise ValueError(f"--suite chess-legal needs a chess model; {args.path} has a {tok.kind} tokenizer")
        games, origin = _games(loaded, args.pgn, args.games)
    except (ValueError, FileNotFoundError) as e:
        print(f"moex: error: {e}", file=sys.stderr)
        return 2
    sample = model_sampler(loaded.model, tok, seed=args.seed)
    res = {"checkpoint": str(loaded.ckpt_dir), "step": loaded.step, "suite": "chess-legal", "games_from": origin,
           "seed": args.seed}
    res["legal"] = legal_rate(games, sample, positions=10, rng=random.Random(args.seed))
    res["continuation"] = continuation(games, sample, opening_plies=6)
    print(f"chess-legal: {origin}, {len(games)} games, checkpoint step {loaded.step}")
    print(f"legal-move rate {res['legal']['legal_rate']:.3f} ({res['legal']['legal_moves']}/"
          f"{res['legal']['positions']} sampled moves at random plies)")
    c = res["continuation"]
    print(f"continuation after 6 plies: {c['mean_legal_plies']:.1f} legal plies on average; "
          f"{100 * c['continue_20']:.0f}% of games reach 20 plies, {100 * c['continue_40']:.0f}% reach 40")
    if args.engine:
        try:
            res["engine"] = {"cmd": args.engine, **play_engine(sample, args.engine, games=args.engine_games)}
        except ValueError as e:
            print(f"moex: error: {e}", file=sys.stderr)
            return 2
        e = res["engine"]
        print(f"vs {args.engine}: W/D/L {e['win']}/{e['draw']}/{e['loss']} ({e['forfeits']} forfeits)")
    out = Path(args.out) if args.out else loaded.run_dir / "eval-chess-legal.json"
    out.write_text(json.dumps(res, indent=2))
    print(f"wrote {out}")
    return 0
