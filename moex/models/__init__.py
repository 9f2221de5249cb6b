"""Model zoo: a GPT-style decoder whose FFN per layer is dense or sparse."""

from moex.models.transformer import GPT, ModelOutput

__all__ = ["GPT", "ModelOutput"]
