"""moex: interpretable sparse Mixture-of-Experts language models.

MoE-X (ReLU experts, sparsity-aware router), Monet and PEER next to dense,
Switch/top-k, expert-choice and aux-loss-free baselines, trained on DeepSpeed.
"""

__version__ = "0.1.0"


def load_pretrained(path, *, device="cpu"):
    """A moex model from a directory written by `moex export` (no DeepSpeed needed); see moex.interop.pretrained."""
    from moex.interop.pretrained import load_pretrained as _load

    return _load(path, device=device)
