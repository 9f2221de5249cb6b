"""`moex compare`: train router/layer variants of one recipe at matched active parameters and report."""

from moex.compare.variants import VARIANTS, variant_overrides

__all__ = ["VARIANTS", "variant_overrides"]
