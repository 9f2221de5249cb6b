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
# Scored by default: the headline and the small groups. `piece` and `empty` (832 more
# properties, ~3x the label non-zeros) on request (--all-groups): scoring time grows with them.
DEFAULT_GROUPS = [HEADLINE, "castling", "en_passant", "check", "material", "side_to_move"]


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
    """Features at (game, pos) pairs for every source (rows in (game, pos) order).

    Dense sources (and, with `resid`, the residual streams `L{i}.resid`) go to
    out_dir/<source>.npy (a float32 memmap); the layers' sparse sources to
    out_dir/<source>.npz (scipy CSR, never densified). Read back with `load_source`.
    """
    import scipy.sparse as sp

    mask_GT = torch.zeros(seqs_GT.shape, dtype=torch.bool)
    mask_GT[torch.as_tensor(game_P), torch.as_tensor(pos_P)] = True
    P = int(mask_GT.sum())
    files: dict[str, Path] = {}
    arrays: dict[str, np.ndarray] = {}
    parts: dict[str, list] = {}
    row = 0
    out_dir.mkdir(parents=True, exist_ok=True)
    for feats in iter_positions(model, seqs_GT, mask_GT, batch_size=batch_size, resid=resid, sparse=True):
        if extra is not None:
            feats.update(extra({k: v for k, v in feats.items() if isinstance(v, torch.Tensor)}))
        n = next(iter(feats.values())).shape[0]
        for name, v in feats.items():
            if sp.issparse(v):
                parts.setdefault(name, []).append(v)
                continue
            if name not in arrays:
                files[name] = out_dir / f"{name}.npy"
                arrays[name] = np.lib.format.open_memmap(files[name], mode="w+", dtype=np.float32,
                                                         shape=(P, v.shape[-1]))
            arrays[name][row : row + n] = v.float().numpy()
        row += n
    for a in arrays.values():
        a.flush()
    for name, chunks in parts.items():
        files[name] = out_dir / f"{name}.npz"
        sp.save_npz(files[name], sp.vstack(chunks, format="csr"))
    return files


def load_source(path: Path):
    """A source written by `extract`: a read-only (P, F) memmap, or a scipy CSR matrix."""
    import scipy.sparse as sp

    path = Path(path)
    return sp.load_npz(path).tocsr() if path.suffix == ".npz" else np.load(path, mmap_mode="r")


def score_source(acts_PF, labels_PQ, train_P: np.ndarray, slices: dict[str, slice], groups: list[str]) -> dict:
    """Coverage (headline and per group of `groups`) on the labelling rows, reconstruction on the held-out rows."""
    tr, te = np.flatnonzero(train_P), np.flatnonzero(~train_P)
    contiguous = len(tr) == 0 or tr[-1] == len(tr) - 1  # labelling games come first: slice, no copy
    a_tr = acts_PF[: len(tr)] if contiguous else acts_PF[tr]
    a_te = acts_PF[len(tr):] if contiguous else acts_PF[te]
    cols = np.concatenate([np.arange(slices[g].start, slices[g].stop) for g in groups])  # scored columns only
    sub, start = {}, 0
    for g in groups:
        sub[g] = slice(start, start + slices[g].stop - slices[g].start)
        start = sub[g].stop
    head = sub[HEADLINE]
    train = bsp.TrainPass(a_tr, labels_PQ[tr][:, cols], label_cols=head)
    rec = bsp.reconstruct(train, a_te, labels_PQ[te][:, slices[HEADLINE]], classes_per_square=len(board.CLASSES))
    return {"features": int(acts_PF.shape[1]), "coverage": train.coverage(head), "reconstruction": rec,
            "coverage_by_group": {g: train.coverage(sl)["score"] for g, sl in sub.items()}}


def run(loaded, *, out_dir: Path, pgn: str | None = None, n_games: int = 1000, batch_size: int = 32,
        sae_extra=None, progress: bool = True, probes: bool = True, groups: list[str] | None = None) -> dict:
    """Coverage and reconstruction for every feature source of a loaded model; with `probes`,
    residual-stream board probes (`probe`) and k-sparse probing per source (`ksparse`).

    Returns a JSON-able dict; per source (`sources[name]`): features, coverage (score =
    headline coverage), reconstruction (score = headline per-class F1, per_square_f1,
    max_active, max_active_per_square), coverage_by_group (for `groups`, default
    DEFAULT_GROUPS).
    """
    from moex.data import load_tokenizer

    games, origin = eval_games(loaded.cfg, pgn=pgn, n_games=n_games)
    tok = load_tokenizer(loaded.run_dir / "tokenizer")
    seqs_GT = encode_games(games, tok)
    groups = list(groups or DEFAULT_GROUPS)
    if HEADLINE not in groups:
        groups.insert(0, HEADLINE)
    game_P, pos_P, labels_PQ, names, slices = board.labels_for_games(games)  # all groups: the probes use them
    order = np.lexsort((pos_P, game_P))  # row-major (game, pos), matching the feature rows
    game_P, pos_P, labels_PQ = game_P[order], pos_P[order], labels_PQ[order]
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
        acts_PF = load_source(files[name])
        if name.endswith(".resid") or probes:
            tr, te = np.flatnonzero(train_P), np.flatnonzero(test_P)
            a_tr, a_te = acts_PF[tr], acts_PF[te]
        if name.endswith(".resid"):  # the residual stream is probed, not scored as features
            probe_res[name] = chess_probes.board_probe(a_tr, a_te, labels_PQ[train_P], labels_PQ[test_P], slices)
            continue
        if probes:
            ksparse_res[name] = chess_probes.ksparse_scores(a_tr, a_te, labels_PQ[train_P], labels_PQ[test_P], slices)
        results[name] = score_source(acts_PF, labels_PQ, train_P, slices, groups)
    out = {"games": len(games), "games_from": origin, "positions": int(len(game_P)), "groups": groups,
           "label_games": split, "heldout_games": len(games) - split, "sources": results}
    if probes:
        out.update(probe=probe_res, ksparse=ksparse_res)
    return out
