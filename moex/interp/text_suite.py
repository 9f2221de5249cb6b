"""The text suite: POS probing against gold UD tags, routing specialisation, top contexts.

Shape key: N probed tokens (over all sentences), F features, E experts, G UPOS tags.

For each UD sentence the model reads its `# text`; every token is mapped to the
UD word it overlaps (subword tokens share their word's tag; whitespace tokens
are dropped). Then, per feature source: per-feature best F1 over POS tags
(`moex.interp.pos`); per sparse layer: expert choice (top gate) vs tag purity and
mutual information, and expert x POS / expert x token-class heatmaps; and a
browsable Markdown page of each source's most tag-selective features with their
top-activating contexts.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from moex.interp import ksparse, pos
from moex.interp.features import collect

TOKEN_CLASSES = ["space+word", "lower", "upper", "digit", "punct", "other"]


def token_offsets(tokenizer, ids: list[int]) -> list[tuple[int, int]]:
    """Character span of each token, from the lengths of decoded prefixes (tokenizers here are lossless)."""
    out, prev = [], 0
    for i in range(len(ids)):
        n = len(tokenizer.decode(ids[: i + 1]))
        out.append((prev, n))
        prev = n
    return out


def token_class(piece: str) -> int:
    if piece[:1].isspace() and piece.strip():
        return 0
    s = piece.strip()
    if not s:
        return 5
    if s.islower():
        return 1
    if s[0].isupper():
        return 2
    if s.isdigit():
        return 3
    if all(not c.isalnum() for c in s):
        return 4
    return 5


@torch.no_grad()
def probe(model, tokenizer, sentences, block_size: int, select=lambda n: True):
    """Features, tags, token classes, contexts and sentence index for every word-aligned token."""
    from moex.data import DataError

    feats: dict[str, list[np.ndarray]] = {}
    tags, classes, contexts, sent = [], [], [], []
    skipped = 0
    for s in sentences:
        try:
            ids = tokenizer.encode(s.text)[:block_size]
        except DataError:  # a character the (char-level) vocabulary has never seen
            skipped += 1
            continue
        if not ids:
            continue
        word_T = pos.align_tokens_to_words(s.text, s.spans or s.words, token_offsets(tokenizer, ids))
        tag_T = pos.token_tags(word_T, s.tag_ids())
        keep = tag_T >= 0
        out = collect(model, torch.tensor([ids]), select)
        for name, v in out.items():
            feats.setdefault(name, []).append(v[0].float().numpy()[keep])
        tags.append(tag_T[keep])
        sent.append(np.full(int(keep.sum()), len(sent)))
        pieces = [tokenizer.decode([t]) for t in ids]
        offs = token_offsets(tokenizer, ids)
        for t in np.nonzero(keep)[0]:
            classes.append(token_class(pieces[t]))
            a, b = offs[t]
            contexts.append(s.text[max(0, a - 40): a] + "**" + s.text[a:b] + "**" + s.text[b: b + 20])
    if not tags:
        raise ValueError(f"no sentence could be encoded with this model's tokenizer ({skipped} skipped)")
    acts = {k: np.concatenate(v) for k, v in feats.items()}
    return acts, np.concatenate(tags), np.array(classes), contexts, skipped, np.concatenate(sent)


def top_contexts(acts_NF: np.ndarray, contexts: list[str], features: list[int], n: int = 5) -> dict[int, list[str]]:
    return {f: [contexts[i] for i in np.argsort(-acts_NF[:, f])[:n] if acts_NF[i, f] > 0] for f in features}


def ksparse_pos(acts_NF, tags_N, sent_N, **kw) -> dict:
    """k-sparse probing of the UPOS tags: ranked and fit on the first half of the sentences, F1 on the rest.

    {"probed", "properties", "f1": {k: mean F1 over probed tags}, "per_tag": {tag: {k: F1}}}.
    """
    train = sent_N < (sent_N.max() + 1) // 2
    onehot_NG = tags_N[:, None] == np.arange(len(pos.UPOS))[None]
    res = ksparse.probe_properties(acts_NF[train], onehot_NG[train], acts_NF[~train], onehot_NG[~train], **kw)
    out = ksparse.summarise(res, {"upos": slice(0, len(pos.UPOS))})["upos"]
    out["per_tag"] = {pos.UPOS[g]: {str(k): float(v[i]) for k, v in res["f1"].items()}
                      for i, g in enumerate(res["properties"])}
    return out


def run(loaded, *, out_dir: Path, conllu: str | None = None, max_sentences: int = 600, batch_size: int = 32,
        sae_extra=None, probes: bool = True) -> dict:
    from moex.data import load_tokenizer
    from moex.data.sources import resolve_path

    path = resolve_path(loaded.cfg.data, conllu or "ud-english-ewt/en_ewt-ud-dev.conllu")
    sentences = pos.read_conllu(path)[:max_sentences]
    tok = load_tokenizer(loaded.run_dir / "tokenizer")
    acts, tags_N, class_N, contexts, skipped, sent_N = probe(loaded.model, tok, sentences, loaded.cfg.model.block_size)
    if sae_extra is not None:
        acts.update({k: v.numpy() for k, v in sae_extra({k: torch.from_numpy(v) for k, v in acts.items()}).items()})
    res = {"sentences": len(sentences) - skipped, "skipped_sentences": skipped, "tokens": int(len(tags_N)), "conllu": str(path), "sources": {},
           "routing": {}}
    md = [f"{len(sentences) - skipped} UD sentences ({skipped} skipped: characters outside the vocabulary) from `{path}`, {len(tags_N)} word-aligned tokens.", "",
          "| source | features | alive | mean best F1 | share F1>0.5 | tag coverage |", "|---|---:|---:|---:|---:|---:|"]
    pages = ["# Most POS-selective features and their top contexts", ""]
    for name, a in acts.items():
        summ = pos.pos_feature_summary(a, tags_N)
        res["sources"][name] = summ
        md.append(f"| {name} | {summ['features']} | {summ['alive']} | {summ['mean_best_f1']:.3f} | "
                  f"{summ['share_f1_above_0.5']:.3f} | {summ['tag_coverage']:.3f} |")
        best_F, tag_F, _ = pos.feature_tag_f1(a, tags_N)
        top = [int(f) for f in np.argsort(-best_F)[:8]]
        pages += [f"## {name}", ""]
        for f, ctx in top_contexts(a, contexts, top).items():
            pages.append(f"- feature {f}: best tag {pos.UPOS[tag_F[f]]} (F1 {best_F[f]:.2f})")
            pages += [f"    - {c}" for c in ctx]
        pages.append("")
    gate_sources = [k for k in acts if k.endswith(".gates")]
    heat = {}
    for name in gate_sources:
        g = acts[name]
        expert_N = g.argmax(1)
        E = g.shape[1]
        res["routing"][name] = {"purity": pos.expert_purity(expert_N, tags_N, E),
                                "mutual_information": pos.mutual_information(expert_N, tags_N, E)}
        heat[name] = (pos.contingency(expert_N, tags_N, E, len(pos.UPOS)),
                      np.bincount(expert_N * len(TOKEN_CLASSES) + class_N,
                                  minlength=E * len(TOKEN_CLASSES)).reshape(E, -1))
    if gate_sources:
        md += ["", "| sparse layer | weighted POS purity | I(expert; POS) bits | normalised |", "|---|---:|---:|---:|"]
        for name, r in res["routing"].items():
            mi = r["mutual_information"]
            md.append(f"| {name} | {r['purity']['weighted_purity']:.3f} | {mi['mi_bits']:.3f} | {mi['normalised']:.3f} |")
    if probes:
        res["ksparse"] = {name: ksparse_pos(a, tags_N, sent_N) for name, a in acts.items()}
        kk = list(ksparse.KS)
        md += ["", "k-sparse probing of UPOS (Gurnee et al. 2023): mean held-out F1 of the best probe on k "
                   "features, ranked by F-statistic and fit on the first half of the sentences, scored on the "
                   "second; over tags with >= 10 tokens in each class there.", "",
               "| source | tags probed | " + " | ".join(f"k={k}" for k in kk) + " |", "|---|---:|" + "---:|" * len(kk)]
        for name, r in res["ksparse"].items():
            md.append(f"| {name} | {r['probed']} | " + " | ".join(
                "–" if r["f1"][str(k)] is None else f"{r['f1'][str(k)]:.3f}" for k in kk) + " |")
    (Path(out_dir) / "features.md").write_text("\n".join(pages) + "\n")
    md += ["", "Top contexts of the most POS-selective features: [features.md](features.md)."]
    res["markdown"] = md
    _heatmaps(heat, Path(out_dir))
    return res


def _heatmaps(heat: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    for name, (pos_EG, cls_EC) in heat.items():
        fig, axes = plt.subplots(1, 2, figsize=(12, 0.4 * pos_EG.shape[0] + 2))
        for ax, m, labels, title in ((axes[0], pos_EG, pos.UPOS, "expert x POS"),
                                     (axes[1], cls_EC, TOKEN_CLASSES, "expert x token class")):
            frac = m / np.maximum(m.sum(0, keepdims=True), 1)  # share of each tag's tokens per expert
            ax.imshow(frac, aspect="auto", cmap="viridis")
            ax.set_xticks(range(len(labels)), labels, rotation=60, ha="right", fontsize=7)
            ax.set_ylabel("expert (top gate)")
            ax.set_title(f"{name}: {title}")
        fig.tight_layout()
        fig.savefig(out / f"routing_{name}.png", dpi=110)
        plt.close(fig)
