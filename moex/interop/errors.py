"""The one error type of model import/export: a checkpoint or layout moex cannot map exactly."""

from moex.errors import MoexError


class InteropError(MoexError, ValueError):
    """A source checkpoint, hub name or model layout that cannot be converted; the message names it."""
