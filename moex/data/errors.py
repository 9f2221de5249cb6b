"""The one exception the data pipeline raises for bad input."""


class DataError(ValueError):
    """Bad or missing data: a corrupt file, an unknown character, a split too small."""
