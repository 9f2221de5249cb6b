"""The chess board-state suite: how well single features recover the board.

Shape key: G games, T characters (= tokens for the chess tokenizer), P probed
positions (the `.` of each move number, first 20 per game), F features,
Q properties.

1. Evaluation games are never training games: for a model trained on a PGN, the
   framework's own validation split of that file; otherwise games read from the
   given PGN (the model never saw them). Strings are the Karvonen format,
   truncated to 256 characters.
2. The first half of the games is the aggregation/labelling set, the second half
   the held-out set for reconstruction.
3. Features of every source are streamed at the probed positions into
   `.npy` memmaps on disk, then scored one source at a time.
4. Unless `probes=False`: a linear board probe of each layer's residual stream
   and k-sparse probing of each feature source (moex.interp.chess_probes).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from moex.interp import board, bsp, chess_probes
from moex.interp.features import iter_positions

MAX_CHARS = 256
HEADLINE = "piece_masked"  # the 768 "masked blank and initial state" properties


def eval_games(cfg, *, pgn: str | None, n_games: int) -> tuple[list[str], str]:
    """Held-out game strings and where they came from."""
    from moex.data import load_documents, read_pgn
    from moex.data.sources import resolve_path

    if cfg.data.source == "pgn" and pgn is None:
        _, val = load_documents(cfg.data)
        games, origin = val, f"validation split of {cfg.data.path} (never trained on)"
    else:
        path = pgn or "chess/games.pgn"
        resolved = resolve_path(cfg.data, path)
        games, origin = read_pgn(resolved, max_games=n_games, cache_dir=cfg.data.cache_dir), str(resolved)
    games = [g[:MAX_CHARS] for g in games[:n_games]]
    if len(games) < 4:
        raise ValueError(f"need at least 4 evaluation games, got {len(games)} from {origin}")
    return games, origin


def encode_games(games: list[str], tokenizer) -> torch.Tensor:
    """(G, T) token ids, padded with spaces at the end (causal: padding never affects probed positions)."""
    T = max(len(g) for g in games)
    pad = tokenizer.encode(" ")[0]
    out = torch.full((len(games), T), pad, dtype=torch.long)
    for i, g in enumerate(games):
        ids = tokenizer.encode(g)
        if len(ids) != len(g):
            raise ValueError("the chess suite needs a character-level chess tokenizer (data.tokenizer=chess)")
        out[i, : len(ids)] = torch.tensor(ids)
    return out


def extract(model, seqs_GT, game_P, pos_P, out_dir: Path, *, batch_size: int, extra=None,
            resid: bool = False) -> dict[str, Path]:
    """Features at (game, pos) pairs for every source, written to out_dir/<source>.npy."""
    mask_GT = torch.zeros(seqs_GT.shape, dtype=torch.bool)
    mask_GT[torch.as_tensor(game_P), torch.as_tensor(pos_P)] = True
    # Row order of mask_GT[...] is row-major (game, pos): sort labels the same way.
    files: dict[str, Path] = {}
    arrays: dict[str, np.ndarray] = {}
    row = 0
    out_dir.mkdir(parents=True, exist_ok=True)
    for feats in iter_positions(model, seqs_GT, mask_GT, batch_size=batch_size, resid=resid):
        if extra is not None:
            feats.update(extra(feats))
        n = next(iter(feats.values())).shape[0]
        for name, v in feats.items():
            if name not in arrays:
                files[name] = out_dir / f"{name}.npy"
                arrays[name] = np.lib.format.open_memmap(files[name], mode="w+", dtype=np.float32,
                                                         shape=(int(mask_GT.sum()), v.shape[-1]))
            arrays[name][row : row + n] = v.float().numpy()
        row += n
    for a in arrays.values():
        a.flush()
    return files


def run(loaded, *, out_dir: Path, pgn: str | None = None, n_games: int = 1000, batch_size: int = 32,
        sae_extra=None, progress: bool = True, probes: bool = True) -> dict:
    """Coverage and reconstruction for every feature source of a loaded model; with `probes`,
    residual-stream board probes (`probe`) and k-sparse probing per source (`ksparse`)."""
    from moex.data import load_tokenizer

    games, origin = eval_games(loaded.cfg, pgn=pgn, n_games=n_games)
    tok = load_tokenizer(loaded.run_dir / "tokenizer")
    seqs_GT = encode_games(games, tok)
    game_P, pos_P, labels_PQ, names, slices = board.labels_for_games(games)
    order = np.lexsort((pos_P, game_P))  # row-major (game, pos), matching the feature rows
    game_P, pos_P, labels_PQ = game_P[order], pos_P[order], labels_PQ[order]
    head = slices[HEADLINE]
    files = extract(loaded.model, seqs_GT, game_P, pos_P, out_dir / "acts", batch_size=batch_size, extra=sae_extra,
                    resid=probes)
    split = len(games) // 2
    train_P, test_P = game_P < split, game_P >= split
    results, probe_res, ksparse_res = {}, {}, {}
    sources = list(files)
    if progress:
        from tqdm import tqdm

        sources = tqdm(sources, desc="chess suite")
    for name in sources:
        acts_PF = np.load(files[name], mmap_mode="r")
        a_tr, a_te = np.asarray(acts_PF[train_P]), np.asarray(acts_PF[test_P])
        if name.endswith(".resid"):  # the residual stream is probed, not scored as features
            probe_res[name] = chess_probes.board_probe(a_tr, a_te, labels_PQ[train_P], labels_PQ[test_P], slices)
            continue
        if probes:
            ksparse_res[name] = chess_probes.ksparse_scores(a_tr, a_te, labels_PQ[train_P], labels_PQ[test_P], slices)
        cov = bsp.coverage(a_tr, labels_PQ[train_P][:, head])
        rec = bsp.reconstruction(a_tr, labels_PQ[train_P][:, head], a_te, labels_PQ[test_P][:, head])
        groups = bsp.coverage(a_tr, labels_PQ[train_P], groups=slices)["groups"]
        results[name] = {"features": int(acts_PF.shape[1]), "coverage": cov, "reconstruction": rec,
                         "coverage_by_group": groups}
    out = {"games": len(games), "games_from": origin, "positions": int(len(game_P)),
           "label_games": split, "heldout_games": len(games) - split, "sources": results}
    if probes:
        out.update(probe=probe_res, ksparse=ksparse_res)
    return out
