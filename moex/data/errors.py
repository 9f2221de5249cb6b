"""The data pipeline's error class (defined with the others in moex.errors)."""

from moex.errors import DataError

__all__ = ["DataError"]
