"""Interpretability: feature sources, the chess board-state suite, SAEs, text/POS probing."""
