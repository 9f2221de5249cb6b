"""Part-of-speech probing: a CoNLL-U reader, token-to-word alignment, and POS metrics.

Shape key: N tokens, F features, W words of a sentence, T tokens of a sentence,
G tags, E experts.

- `read_conllu` keeps syntactic words with their UPOS (multiword range lines
  `a-b` only give the surface form; empty nodes `a.b` are skipped).
- `align_tokens_to_words` maps a tokenizer's character offsets to words: a
  (sub)word token belongs to the word whose character span it overlaps most;
  tokens overlapping no word (whitespace) map to -1.
- Metrics: per-feature best F1 over tags; per-expert purity; mutual information
  between expert choice and tag (bits).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from moex.interp.bsp import Labels, f1_matrix, feature_max, tp_counts

UPOS = ["ADJ", "ADP", "ADV", "AUX", "CCONJ", "DET", "INTJ", "NOUN", "NUM", "PART", "PRON", "PROPN", "PUNCT",
        "SCONJ", "SYM", "VERB", "X"]
TAG_ID = {t: i for i, t in enumerate(UPOS)}


@dataclass
class Sentence:
    """One UD sentence: its text, its syntactic words with UPOS, and each word's character span in text."""

    text: str
    words: list[str]
    upos: list[str]
    spans: list[tuple[int, int]] = field(default_factory=list)
    sent_id: str = ""

    def tag_ids(self) -> np.ndarray:
        return np.array([TAG_ID[t] for t in self.upos], dtype=np.int64)


class ConlluError(ValueError):
    pass


def _locate(text: str, forms: list[tuple[str, list[str]]], where: str) -> list[tuple[int, int]]:
    """Character span of every word; `forms` = (surface form, its words) in order."""
    spans, cursor = [], 0
    for form, words in forms:
        start = text.find(form, cursor)
        if start < 0:
            raise ConlluError(f"{where}: word {form!r} not found in the sentence text {text!r}")
        end = start + len(form)
        if "".join(words) == form:  # "didn't" -> did + n't: split the surface span exactly
            for w in words:
                spans.append((start, start + len(w)))
                start += len(w)
        else:  # surface differs from its words: every word shares the whole span
            spans += [(start, end)] * len(words)
        cursor = end
    return spans


def read_conllu(path: str | Path) -> list[Sentence]:
    """Sentences of a CoNLL-U file; a malformed line raises ConlluError naming file and line."""
    path = Path(path)
    out: list[Sentence] = []
    text, sent_id, words, upos, forms, range_end, start_line = None, "", [], [], [], 0, 1

    def finish():
        if not words:
            return
        where = f"{path}:{start_line}"
        t = text if text is not None else " ".join(words)
        out.append(Sentence(t, list(words), list(upos), _locate(t, forms, where), sent_id))

    with open(path, encoding="utf-8") as f:
        for lineno, raw in enumerate(f, 1):
            line = raw.rstrip("\n")
            if not line.strip():
                finish()
                text, sent_id, words, upos, forms, range_end, start_line = None, "", [], [], [], 0, lineno + 1
                continue
            if line.startswith("#"):
                key, _, value = line[1:].partition("=")
                if key.strip() == "text":
                    text = value.strip()
                elif key.strip() == "sent_id":
                    sent_id = value.strip()
                continue
            cols = line.split("\t")
            if len(cols) != 10:
                raise ConlluError(f"{path}:{lineno}: expected 10 tab-separated columns, got {len(cols)}: {line!r}")
            wid = cols[0]
            if "." in wid:  # empty node of the enhanced graph: not a word of the text
                continue
            if "-" in wid:  # multiword token: its surface form covers the next words
                a, _, b = wid.partition("-")
                if not (a.isdigit() and b.isdigit()):
                    raise ConlluError(f"{path}:{lineno}: bad range id {wid!r}")
                forms.append((cols[1], []))
                range_end = int(b)
                continue
            if not wid.isdigit():
                raise ConlluError(f"{path}:{lineno}: bad word id {wid!r}")
            if cols[3] not in TAG_ID:
                raise ConlluError(f"{path}:{lineno}: unknown UPOS {cols[3]!r}; valid: {UPOS}")
            words.append(cols[1])
            upos.append(cols[3])
            if int(wid) <= range_end:
                forms[-1][1].append(cols[1])
            else:
                forms.append((cols[1], [cols[1]]))
    finish()
    return out


def word_spans(text: str, words: list[str]) -> list[tuple[int, int]]:
    """Character span of each word, found left to right in text."""
    return _locate(text, [(w, [w]) for w in words], "word_spans")


def align_tokens_to_words(text: str, words, token_offsets) -> np.ndarray:
    """word index per token (-1: the token overlaps no word, e.g. whitespace).

    `words`: word strings (located left to right in text) or (start, end) spans;
    `token_offsets`: (start, end) character offsets of each token in text.
    A token overlapping several words goes to the one it overlaps most (first on ties).
    """
    spans = words if words and not isinstance(words[0], str) else word_spans(text, list(words))
    s_W = np.array([s for s, _ in spans], dtype=np.int64).reshape(-1)
    e_W = np.array([e for _, e in spans], dtype=np.int64).reshape(-1)
    off_T2 = np.asarray(token_offsets, dtype=np.int64).reshape(-1, 2)
    overlap_TW = np.minimum(off_T2[:, 1:2], e_W[None]) - np.maximum(off_T2[:, :1], s_W[None])
    if overlap_TW.shape[1] == 0:
        return np.full(len(off_T2), -1, dtype=np.int64)
    best_T = overlap_TW.argmax(1)
    return np.where(overlap_TW.max(1) > 0, best_T, -1)


def token_tags(word_idx_T: np.ndarray, tags_W: np.ndarray) -> np.ndarray:
    """Tag id per token via its word; -1 where the token has no word."""
    word_idx_T = np.asarray(word_idx_T)
    return np.where(word_idx_T >= 0, np.asarray(tags_W)[np.maximum(word_idx_T, 0)], -1)


def feature_tag_f1(acts_NF: np.ndarray, tags_N: np.ndarray, n_tags: int = len(UPOS), threshold: float = 0.0,
                   relative: bool = False) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(best F1 per feature, its tag, best F1 per tag over features).

    A feature fires when activation > threshold (x |its max| when `relative`, Karvonen's scale).
    Tokens with tag -1 are ignored.
    """
    keep = np.asarray(tags_N) >= 0
    acts_NF, tags_N = np.asarray(acts_NF)[keep], np.asarray(tags_N)[keep]
    scale_F = feature_max(acts_NF) if relative else np.ones(acts_NF.shape[1])
    fires_NF = acts_NF > threshold * scale_F[None]
    onehot_NG = tags_N[:, None] == np.arange(n_tags)[None]
    labels = Labels(onehot_NG)
    f1_FG = f1_matrix(*tp_counts(fires_NF, labels), labels.actual_Q)[0]
    return f1_FG.max(1), f1_FG.argmax(1), f1_FG.max(0) if len(f1_FG) else np.zeros(n_tags)


def pos_feature_summary(acts_NF, tags_N, n_tags: int = len(UPOS), threshold: float = 0.0) -> dict:
    """JSON-able: mean best F1 over alive features, share above 0.5, mean best F1 per tag (coverage)."""
    best_F, tag_F, best_G = feature_tag_f1(acts_NF, tags_N, n_tags, threshold)
    alive_F = (np.asarray(acts_NF)[np.asarray(tags_N) >= 0] > threshold).any(0)
    present_G = np.bincount(np.asarray(tags_N)[np.asarray(tags_N) >= 0], minlength=n_tags) > 0
    return {
        "features": int(len(best_F)), "alive": int(alive_F.sum()),
        "mean_best_f1": float(best_F[alive_F].mean()) if alive_F.any() else 0.0,
        "share_f1_above_0.5": float((best_F[alive_F] > 0.5).mean()) if alive_F.any() else 0.0,
        "tag_coverage": float(best_G[present_G].mean()) if present_G.any() else 0.0,
    }


def contingency(expert_N: np.ndarray, tags_N: np.ndarray, n_experts: int, n_tags: int) -> np.ndarray:
    """counts_EG: tokens routed to expert e with tag g (tokens with tag -1 dropped)."""
    expert_N, tags_N = np.asarray(expert_N), np.asarray(tags_N)
    keep = tags_N >= 0
    flat = expert_N[keep] * n_tags + tags_N[keep]
    return np.bincount(flat, minlength=n_experts * n_tags).reshape(n_experts, n_tags)


def expert_purity(expert_N, tags_N, n_experts: int, n_tags: int = len(UPOS)) -> dict:
    """Per expert: share of its tokens carrying its most common tag; the token-weighted mean; the majority tags."""
    counts_EG = contingency(expert_N, tags_N, n_experts, n_tags)
    total_E = counts_EG.sum(1)
    purity_E = np.where(total_E > 0, counts_EG.max(1) / np.maximum(total_E, 1), 0.0)
    return {"purity": purity_E.tolist(), "majority_tag": counts_EG.argmax(1).tolist(),
            "tokens": total_E.tolist(), "weighted_purity": float(counts_EG.max(1).sum() / max(total_E.sum(), 1))}


def mutual_information(expert_N, tags_N, n_experts: int, n_tags: int = len(UPOS)) -> dict:
    """I(expert; tag) in bits from the empirical joint, and normalised by H(tag)."""
    counts_EG = contingency(expert_N, tags_N, n_experts, n_tags).astype(np.float64)
    joint = counts_EG / max(counts_EG.sum(), 1.0)
    p_E, p_G = joint.sum(1, keepdims=True), joint.sum(0, keepdims=True)
    nz = joint > 0
    mi = float((joint[nz] * np.log2(joint[nz] / (p_E @ p_G)[nz])).sum())
    h_tag = float(-(p_G[p_G > 0] * np.log2(p_G[p_G > 0])).sum())
    return {"mi_bits": mi, "tag_entropy_bits": h_tag, "normalised": mi / h_tag if h_tag > 0 else 0.0}
