"""moex: interpretable sparse Mixture-of-Experts language models.

MoE-X (ReLU experts, sparsity-aware router), Monet and PEER next to dense,
Switch/top-k, expert-choice and aux-loss-free baselines, trained on DeepSpeed.
"""

__version__ = "0.1.0"
