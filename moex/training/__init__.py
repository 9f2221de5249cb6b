"""Training: the DeepSpeed trainer, LR schedule, atomic checkpoints."""
