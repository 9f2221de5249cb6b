"""SAEs on synthetic sparse data (x = sparse codes @ dictionary): training, sparsity, dead latents, I/O."""

import pytest
import torch

from moex.interp.sae import SAE, ReLUSAE, SAEConfig, TopKSAE, quality, spliced_loss_recovered, train_sae


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny matmuls: intra-op threads only add contention (100x slower on a loaded 2-core box)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def sparse_data(N=2048, D=16, L=32, k=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    dictionary = torch.randn(L, D, generator=g)
    dictionary /= dictionary.norm(dim=1, keepdim=True)
    codes = torch.zeros(N, L)
    idx = torch.stack([torch.randperm(L, generator=g)[:k] for _ in range(N)])
    codes.scatter_(1, idx, torch.rand(N, k, generator=g) + 0.5)
    return codes @ dictionary


@pytest.mark.parametrize("kind", ["topk", "relu"])
def test_training_reduces_reconstruction_error(kind):
    x = sparse_data()
    cfg = SAEConfig(kind=kind, d_in=16, d_latent=64, k=4, steps=300, batch_size=256, lr=3e-3, l1_coef=1e-3)
    before = quality(SAE(cfg), x)["mse"]
    sae, q = train_sae(x, cfg, progress=False)
    assert q["mse"] < 0.25 * before and q["mse"] < 0.25 * q["mse_init"] and q["explained_variance"] > 0.8
    assert torch.allclose(sae.W_dec_DL.norm(dim=0), torch.ones(64), atol=1e-5)  # unit-norm decoder columns
    if kind == "topk":
        assert q["l0"] == pytest.approx(4.0, abs=0.05)


def test_training_from_an_iterator_of_batches():
    x = sparse_data(N=4096)
    cfg = SAEConfig(d_in=16, d_latent=64, k=4, steps=200, lr=3e-3)
    batches = (x[i : i + 16] for i in range(0, 4096, 16))  # 256 batches: cfg.steps stops first
    sae, q = train_sae(batches, cfg, progress=False)
    assert q["steps"] == 200 and q["mse"] < 0.5 * q["mse_init"]
    assert train_sae(iter([x[:16]] * 5), cfg, progress=False)[1]["steps"] == 5
    with pytest.raises(ValueError, match="no training data"):
        train_sae(iter([]), SAEConfig(d_in=16, d_latent=64, k=4), progress=False)


def test_explained_variance_and_mse_match_hand_formula():
    sae = ReLUSAE(4, 8, l1_coef=0.0)
    x = torch.randn(100, 4)
    with torch.no_grad():
        x_hat, _ = sae(x)
    q = quality(sae, x, batch_size=7)  # batching must not change anything
    assert q["mse"] == pytest.approx(float(((x - x_hat) ** 2).mean()), rel=1e-5)
    ev = 1 - float(((x - x_hat) ** 2).sum()) / float(((x - x.mean(0)) ** 2).sum())
    assert q["explained_variance"] == pytest.approx(ev, rel=1e-5)


def test_topk_l0_is_exactly_k():
    sae = TopKSAE(16, 64, 5)
    with torch.no_grad():
        sae.b_enc_L.fill_(10.0)  # every pre-activation positive, so exactly k survive
    z = sae.encode(torch.randn(50, 16))
    assert ((z > 0).sum(-1) == 5).all()
    with torch.no_grad():
        sae.b_enc_L.fill_(-100.0)  # nothing positive: ReLU leaves nothing, never more than k
    assert (sae.encode(torch.randn(50, 16)) == 0).all()
    with pytest.raises(ValueError, match="k <= d_latent"):
        TopKSAE(4, 8, 9)


def test_dead_latents_counted():
    sae = ReLUSAE(4, 6, l1_coef=1e-3)
    with torch.no_grad():
        sae.W_enc_LD.zero_()
        sae.b_enc_L.copy_(torch.tensor([1.0, 1.0, -1.0, -1.0, -1.0, 1.0]))
    q = quality(sae, torch.randn(10, 4))
    assert q["dead_latents"] == 3 and q["l0"] == 3


def test_save_load_roundtrip(tmp_path):
    sae = SAE(SAEConfig(d_in=8, d_latent=16, k=2))
    sae.save(tmp_path / "s.pt", {"source": "L1.mlp.post"})
    back, blob = SAE.load(tmp_path / "s.pt")
    x = torch.randn(3, 8)
    torch.testing.assert_close(back.encode(x), sae.encode(x))
    assert blob["source"] == "L1.mlp.post" and back.cfg == sae.cfg


def test_loss_recovered_formula():
    assert spliced_loss_recovered(1.0, 1.5, 3.0) == pytest.approx(0.75)
    assert spliced_loss_recovered(2.0, 2.0, 5.0) == pytest.approx(1.0)
    assert spliced_loss_recovered(2.0, 5.0, 5.0) == pytest.approx(0.0)
