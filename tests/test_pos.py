"""CoNLL-U reading, token/word alignment on real UD sentences, POS metrics against hand-computed values."""

from pathlib import Path

import numpy as np
import pytest

from moex.interp import pos

EWT_DEV = Path(__file__).resolve().parents[2] / "shared/data/ud-english-ewt/en_ewt-ud-dev.conllu"
needs_ewt = pytest.mark.skipif(not EWT_DEV.exists(), reason="shared UD data not present")

SMALL = """# sent_id = s1
# text = They didn't go.
1\tThey\tthey\tPRON\tPRP\t_\t3\tnsubj\t_\t_
2-3\tdidn't\t_\t_\t_\t_\t_\t_\t_\t_
2\tdid\tdo\tAUX\tVBD\t_\t4\taux\t_\t_
3\tn't\tnot\tPART\tRB\t_\t4\tadvmod\t_\t_
4\tgo\tgo\tVERB\tVB\t_\t0\troot\t_\tSpaceAfter=No
4.1\tgo\tgo\tVERB\tVB\t_\t_\t_\t_\t_
5\t.\t.\tPUNCT\t.\t_\t4\tpunct\t_\t_

# text = Hi
1\tHi\thi\tINTJ\tUH\t_\t0\troot\t_\t_
"""


def test_read_conllu_skips_ranges_and_empty_nodes(tmp_path):
    f = tmp_path / "small.conllu"
    f.write_text(SMALL)
    s1, s2 = pos.read_conllu(f)
    assert s1.sent_id == "s1" and s1.text == "They didn't go."
    assert s1.words == ["They", "did", "n't", "go", "."]
    assert s1.upos == ["PRON", "AUX", "PART", "VERB", "PUNCT"]
    assert s1.spans == [(0, 4), (5, 8), (8, 11), (12, 14), (14, 15)]
    assert s1.tag_ids().tolist() == [pos.TAG_ID[t] for t in s1.upos]
    assert s2.words == ["Hi"] and s2.upos == ["INTJ"]


def test_malformed_line_names_file_and_line(tmp_path):
    f = tmp_path / "bad.conllu"
    f.write_text(SMALL.replace("1\tHi\thi\tINTJ", "1\tHi\tINTJ"))
    with pytest.raises(pos.ConlluError, match=r"bad\.conllu:12: expected 10"):
        pos.read_conllu(f)
    f.write_text(SMALL.replace("PRON", "PRONOUN"))
    with pytest.raises(pos.ConlluError, match=r"bad\.conllu:3: unknown UPOS"):
        pos.read_conllu(f)


@needs_ewt
def test_real_treebank_words_match_their_spans():
    sents = pos.read_conllu(EWT_DEV)
    assert len(sents) == 2001 and sum(len(s.words) for s in sents) == 25147
    assert all(s.text[a:b] == w for s in sents for w, (a, b) in zip(s.words, s.spans))
    first = sents[0]
    assert first.words == ["From", "the", "AP", "comes", "this", "story", ":"]
    assert first.upos == ["ADP", "DET", "PROPN", "VERB", "DET", "NOUN", "PUNCT"]


@needs_ewt
def test_align_hand_tokenised_real_sentences():
    sents = pos.read_conllu(EWT_DEV)
    s = sents[0]  # "From the AP comes this story :"
    toks = [(0, 2), (2, 4), (4, 8), (8, 10), (10, 11), (11, 12), (12, 17), (17, 22), (22, 28), (28, 29), (29, 30)]
    assert [s.text[a:b] for a, b in toks] == ["Fr", "om", " the", " A", "P", " ", "comes", " this", " story", " ",
                                              ":"]
    expect = [0, 0, 1, 2, 2, -1, 3, 4, 5, -1, 6]
    assert pos.align_tokens_to_words(s.text, s.words, toks).tolist() == expect
    assert pos.align_tokens_to_words(s.text, s.spans, toks).tolist() == expect
    s = next(x for x in sents if x.text.endswith("but they didn't."))
    end = len(s.text)
    toks = [(end - 13, end - 8), (end - 8, end - 4), (end - 4, end - 2), (end - 2, end)]
    assert [s.text[a:b] for a, b in toks] == [" they", " did", "n'", "t."]
    w = pos.align_tokens_to_words(s.text, s.words, toks)
    assert [s.words[i] for i in w] == ["they", "did", "n't", "n't"]  # "t." overlaps n't (1) and . (1): first
    whole = pos.align_tokens_to_words(s.text, s.words, [(end - 7, end - 1)])  # "didn't": equal overlap -> did
    assert s.words[whole[0]] == "did"


def test_token_tags():
    assert pos.token_tags(np.array([0, -1, 2, 1]), np.array([5, 6, 7])).tolist() == [5, -1, 7, 6]


def test_feature_tag_f1_by_hand():
    N, V = pos.TAG_ID["NOUN"], pos.TAG_ID["VERB"]
    tags = np.array([N, N, N, N, V, V, -1])
    acts = np.zeros((7, 3), np.float32)
    acts[:4, 0] = 1.0  # exactly the nouns
    acts[[0, 1, 4, 5], 1] = 0.3  # 2 nouns + both verbs: NOUN F1 1/2, VERB F1 2/3
    acts[6, 2] = 5.0  # fires only on an untagged token: ignored, so dead
    best, tag, per_tag = pos.feature_tag_f1(acts, tags)
    assert best[:2] == pytest.approx([1.0, 2 / 3], abs=1e-6) and tag[:2].tolist() == [N, V] and best[2] == 0
    assert per_tag[N] == pytest.approx(1.0, abs=1e-6) and per_tag[V] == pytest.approx(2 / 3, abs=1e-6)
    assert pos.feature_tag_f1(acts, tags, threshold=0.5)[0][1] == 0  # 0.3 < 0.5: never fires
    summ = pos.pos_feature_summary(acts, tags)
    assert summ["alive"] == 2 and summ["mean_best_f1"] == pytest.approx((1 + 2 / 3) / 2, abs=1e-6)
    assert summ["tag_coverage"] == pytest.approx((1 + 2 / 3) / 2, abs=1e-6)


def test_purity_and_mutual_information_by_hand():
    # expert 0: tags A A B; expert 1: B B B. p(e)=(1/2,1/2), p(g)=(1/3,2/3)
    experts, tags = np.array([0, 0, 0, 1, 1, 1]), np.array([0, 0, 1, 1, 1, 1])
    pur = pos.expert_purity(experts, tags, n_experts=2, n_tags=2)
    assert pur["purity"] == pytest.approx([2 / 3, 1.0]) and pur["weighted_purity"] == pytest.approx(5 / 6)
    assert pur["majority_tag"] == [0, 1] and pur["tokens"] == [3, 3]
    mi = pos.mutual_information(experts, tags, n_experts=2, n_tags=2)
    by_hand = 1 / 3 * np.log2(2) + 1 / 6 * np.log2(1 / 2) + 1 / 2 * np.log2(3 / 2)
    h = -(1 / 3 * np.log2(1 / 3) + 2 / 3 * np.log2(2 / 3))
    assert mi["mi_bits"] == pytest.approx(by_hand) and mi["tag_entropy_bits"] == pytest.approx(h)
    assert mi["normalised"] == pytest.approx(by_hand / h)
    indep = pos.mutual_information(np.array([0, 1, 0, 1]), np.array([0, 0, 1, 1]), n_experts=2, n_tags=2)
    assert indep["mi_bits"] == pytest.approx(0.0, abs=1e-12)
    same = pos.mutual_information(np.array([0, 1, 2, 2, 0]), np.array([0, 1, 2, 2, 0]), n_experts=3, n_tags=3)
    assert same["normalised"] == pytest.approx(1.0)
