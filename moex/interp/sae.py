"""Sparse autoencoders on a model's activations: the SAE baseline MoE-X compares against.

Shape key: N samples, D input dim, L latents.

TopK (Gao et al. 2024): z = TopK(ReLU(W_enc (x - b_dec) + b_enc)), so at most k
latents are non-zero, exactly k whenever k pre-activations are positive (the
usual case). ReLU: z = ReLU(...), loss MSE + l1 * sum_l |z_l| * |W_dec col l|.
x_hat = W_dec z + b_dec; b_dec is subtracted before encoding ("pre-encoder
bias") and starts at the data mean. Decoder columns are kept at unit norm.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterable

import torch
from torch import Tensor, nn


@dataclass(kw_only=True)
class SAEConfig:
    kind: str = "topk"  # topk | relu
    d_in: int = 256
    d_latent: int = 2048
    k: int = 32  # topk
    l1_coef: float = 1e-3  # relu
    lr: float = 1e-3
    steps: int = 2000
    batch_size: int = 1024
    seed: int = 0


class SAE(nn.Module):
    """A TopK or ReLU sparse autoencoder, per `cfg.kind`."""

    def __init__(self, cfg: SAEConfig):
        super().__init__()
        if cfg.kind not in ("topk", "relu"):
            raise ValueError(f"unknown SAE kind {cfg.kind!r}; valid: topk, relu")
        if cfg.kind == "topk" and not 0 < cfg.k <= cfg.d_latent:
            raise ValueError(f"TopK SAE needs 0 < k <= d_latent, got k={cfg.k}, d_latent={cfg.d_latent}")
        self.cfg = cfg
        g = torch.Generator().manual_seed(cfg.seed)
        w = torch.randn(cfg.d_in, cfg.d_latent, generator=g)
        w = w / w.norm(dim=0, keepdim=True)
        self.W_dec_DL = nn.Parameter(w)
        self.W_enc_LD = nn.Parameter(w.T.clone())  # tied at init
        self.b_enc_L = nn.Parameter(torch.zeros(cfg.d_latent))
        self.b_dec_D = nn.Parameter(torch.zeros(cfg.d_in))

    def encode(self, x_ND: Tensor) -> Tensor:
        """Latents z_NL (non-negative; at most k non-zero per row for TopK)."""
        pre = torch.relu((x_ND - self.b_dec_D) @ self.W_enc_LD.T + self.b_enc_L)
        if self.cfg.kind == "topk":
            vals, idx = pre.topk(self.cfg.k, dim=-1)
            return torch.zeros_like(pre).scatter(-1, idx, vals)
        return pre

    def decode(self, z_NL: Tensor) -> Tensor:
        return z_NL @ self.W_dec_DL.T + self.b_dec_D

    def forward(self, x_ND: Tensor) -> tuple[Tensor, Tensor]:
        z = self.encode(x_ND)
        return self.decode(z), z

    def loss(self, x_ND: Tensor) -> Tensor:
        """Summed-over-D squared error, mean over N; plus the weighted L1 for ReLU SAEs."""
        x_hat, z = self(x_ND)
        mse = (x_hat - x_ND).pow(2).sum(-1).mean()
        if self.cfg.kind == "relu":
            mse = mse + self.cfg.l1_coef * (z * self.W_dec_DL.norm(dim=0)).sum(-1).mean()
        return mse

    @torch.no_grad()
    def normalize_decoder(self) -> None:
        self.W_dec_DL /= self.W_dec_DL.norm(dim=0, keepdim=True).clamp_min(1e-8)

    def save(self, path: str | Path, extra: dict | None = None) -> None:
        """State dict + config (+ any JSON-like extras) in one torch file."""
        torch.save({"config": asdict(self.cfg), "state": self.state_dict(), **(extra or {})}, path)

    @classmethod
    def load(cls, path: str | Path) -> tuple["SAE", dict]:
        """(sae in eval mode, the saved blob with its extras)."""
        blob = torch.load(path, map_location="cpu")
        sae = cls(SAEConfig(**blob["config"]))
        sae.load_state_dict(blob["state"])
        return sae.eval(), blob


def TopKSAE(d_in: int, d_latent: int, k: int, **kw) -> SAE:
    """A TopK SAE (kw: other SAEConfig fields)."""
    return SAE(SAEConfig(kind="topk", d_in=d_in, d_latent=d_latent, k=k, **kw))


def ReLUSAE(d_in: int, d_latent: int, l1_coef: float, **kw) -> SAE:
    """A ReLU + L1 SAE (kw: other SAEConfig fields)."""
    return SAE(SAEConfig(kind="relu", d_in=d_in, d_latent=d_latent, l1_coef=l1_coef, **kw))


@torch.no_grad()
def quality(sae: SAE, x_ND: Tensor, batch_size: int = 8192) -> dict:
    """L0, fraction of variance explained, MSE (per element), dead latents (never > 0 on x)."""
    sq_err, l0, fired_L = 0.0, 0.0, torch.zeros(sae.cfg.d_latent, dtype=torch.bool)
    for s in range(0, len(x_ND), batch_size):
        x = x_ND[s : s + batch_size].float()
        x_hat, z = sae(x)
        sq_err += float((x - x_hat).pow(2).sum())
        l0 += float((z > 0).sum())
        fired_L |= (z > 0).any(0)
    total = float((x_ND.float() - x_ND.float().mean(0)).pow(2).sum())
    n = max(len(x_ND), 1)
    return {
        "l0": l0 / n,
        "explained_variance": 1 - sq_err / max(total, 1e-12),
        "mse": sq_err / (n * x_ND.shape[1]),
        "dead_latents": int((~fired_L).sum()),
        "latents": sae.cfg.d_latent,
    }


def _batches(x, cfg: SAEConfig, g: torch.Generator):
    """Minibatches: random rows of a tensor, or the batches of an iterator as they come."""
    if isinstance(x, Tensor):
        for _ in range(cfg.steps):
            yield x[torch.randint(0, len(x), (cfg.batch_size,), generator=g)]
    else:
        for step, batch in enumerate(x):
            if step >= cfg.steps:
                return
            yield torch.as_tensor(batch)


def train_sae(x_ND: Tensor | Iterable[Tensor], cfg: SAEConfig, *, progress: bool = True,
              eval_rows: int = 65536) -> tuple[SAE, dict]:
    """Train with Adam for `cfg.steps` minibatches; returns (sae, quality metrics).

    `x_ND` is a (N, D) tensor (sampled with replacement) or an iterable of (B, D)
    batches (used in order). Metrics are on the tensor, or on the first
    `eval_rows` rows the iterator yields; `mse_init` is the untrained SAE's MSE
    (on the tensor, or on the iterator's first batch).
    """
    torch.manual_seed(cfg.seed)
    sae = SAE(cfg)
    g = torch.Generator().manual_seed(cfg.seed)
    opt = torch.optim.Adam(sae.parameters(), lr=cfg.lr)
    batches = _batches(x_ND, cfg, g)
    if progress:
        from tqdm import tqdm

        batches = tqdm(batches, total=cfg.steps, desc=f"{cfg.kind} SAE")
    held, n_held, mse_init, steps = [], 0, None, 0
    for batch in batches:
        batch = batch.float()
        if steps == 0:  # b_dec starts at the data mean: latents then code deviations only
            with torch.no_grad():
                sae.b_dec_D.copy_((x_ND if isinstance(x_ND, Tensor) else batch).float().mean(0))
            mse_init = quality(sae, x_ND if isinstance(x_ND, Tensor) else batch)["mse"]
        if not isinstance(x_ND, Tensor) and n_held < eval_rows:
            held.append(batch[: eval_rows - n_held])
            n_held += len(held[-1])
        loss = sae.loss(batch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sae.normalize_decoder()
        steps += 1
        if progress and steps % 50 == 0:
            batches.set_postfix(loss=f"{float(loss):.4g}")
    if steps == 0:
        raise ValueError("train_sae: no training data")
    sae.eval()
    q = quality(sae, x_ND if isinstance(x_ND, Tensor) else torch.cat(held))
    q.update({"mse_init": mse_init, "steps": steps, "kind": cfg.kind})
    return sae, q


def spliced_loss_recovered(loss_clean: float, loss_spliced: float, loss_zero: float) -> float:
    """(loss_zero - loss_spliced) / (loss_zero - loss_clean): 1 = the SAE loses nothing, 0 = as bad as ablation."""
    return (loss_zero - loss_spliced) / (loss_zero - loss_clean)
