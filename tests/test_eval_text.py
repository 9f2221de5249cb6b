"""Sliding-window perplexity against a per-token reference, today's block figure, the word-count rule."""

from pathlib import Path

import numpy as np
import pytest
import torch

from moex import config as C
from moex.data import TokenBlocks
from moex.data.sources import count_words
from moex.eval.perplexity import evaluate, sliding_window_nll, window_starts
from moex.models import GPT

T = 8  # block_size
WIKI_VALID = Path(__file__).resolve().parents[2] / "shared/data/wikitext-2/valid.txt"


def tiny(ffn="moe", vocab=16):
    cfg = C.load(None, [f"model.vocab_size={vocab}", "model.n_layer=2", "model.d_model=32", "model.n_head=4",
                        f"model.block_size={T}", f"model.ffn={ffn}", "model.moe.d_expert=8", "model.d_ff=32"])
    torch.manual_seed(0)
    return GPT(cfg.model).eval()


def reference_nll(model, tokens, stride):
    """Per token t: -log p(t | tokens[s:t]) where s starts the first window that scores t (plain loop)."""
    starts, scored, total = window_starts(len(tokens), T, stride), set(), 0.0
    for s in starts:
        for t in range(s + 1, s + T + 1):
            if t in scored:
                continue
            scored.add(t)
            ctx = torch.tensor(tokens[s:t])[None]
            total -= model(ctx).logits[0, -1].log_softmax(-1)[tokens[t]].item()
    return total, scored


@pytest.mark.parametrize("stride", [1, 3, T, T + 1])
def test_sliding_window_matches_per_token_reference(stride):
    model = tiny("dense")
    tokens = np.random.default_rng(0).integers(0, 16, 41)
    res = sliding_window_nll(model, tokens, block_size=T, stride=stride, batch_size=3)
    want, scored = reference_nll(model, tokens, stride)
    assert res["tokens"] == len(scored)
    if stride <= T:  # every token but the first is scored
        assert scored == set(range(1, 41))
    else:  # non-overlapping blocks: each block's first token is context only, the tail is skipped
        assert scored == {t for t in range(1, 36) if t % (T + 1)}
    assert res["total_nll"] == pytest.approx(want, rel=1e-5)


def test_stride_block_size_plus_one_is_todays_block_figure(tmp_path):
    model = tiny()
    tokens = np.random.default_rng(1).integers(0, 16, 100).astype(np.uint16)
    tokens.tofile(tmp_path / "val.bin")
    blocks = TokenBlocks(tmp_path / "val.bin", T, np.uint16)
    today = evaluate(model, blocks, batch_size=4)
    slid = sliding_window_nll(model, tokens, block_size=T, stride=T + 1, batch_size=5)
    assert slid["tokens"] == today["tokens"] == 11 * T
    assert slid["ppl"] == pytest.approx(today["ppl"], rel=1e-6)


@pytest.mark.slow
def test_smaller_stride_never_raises_perplexity_of_a_trained_model():
    # a stream whose next token needs two tokens of context: after 0 comes 1, 2 or 3 in turn
    pattern = [0, 1, 0, 2, 0, 3, 4]
    stream = np.array(pattern * 40)
    model = tiny("dense", vocab=8).train()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    torch.manual_seed(0)
    for _ in range(121):  # a few steps on random windows
        s = torch.randint(0, len(stream) - T - 1, (16,))
        w = torch.stack([torch.as_tensor(stream[i : i + T + 1]) for i in s.tolist()])
        loss = model(w[:, :-1], w[:, 1:]).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    strides = (T + 1, T, 6, 4, 2, 1)
    ppl = [sliding_window_nll(model, stream, block_size=T, stride=s, batch_size=16)["ppl"] for s in strides]
    assert all(b <= a * (1 + 1e-3) for a, b in zip(ppl, ppl[1:])), ppl
    assert ppl[-1] < 0.97 * ppl[1]  # context helps this model: a window that lost context would show


def test_window_starts_edges():
    assert window_starts(20, T, T + 1) == [0, 9]  # the tail of 2 tokens fills no block
    assert window_starts(20, T, T) == [0, 8, 11]  # a last window ends at the stream's end
    with pytest.raises(ValueError, match="stride"):
        window_starts(20, T, T + 2)
    with pytest.raises(ValueError, match="fewer than one window"):
        window_starts(5, T, 1)


def test_word_count_rule_against_hand_count():
    lines = ["The cat sat .", "", " = Heading = ", "end"]
    assert count_words(lines) == 4 + 0 + 3 + 1
    assert count_words(lines, eol=True) == 8 + 4  # one end-of-line per line, empty ones too
    if WIKI_VALID.is_file():  # the published WikiText-2 valid figures
        text = WIKI_VALID.read_text(encoding="utf-8").split("\n")[:-1]
        assert (count_words(text), count_words(text, eol=True)) == (213_886, 217_646)
