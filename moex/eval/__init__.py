"""Evaluation: perplexity, load balance, expert sparsity."""
