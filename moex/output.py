"""Output directories that leave nothing behind when the command writing them fails."""

from __future__ import annotations

import contextlib
import shutil
from pathlib import Path


@contextlib.contextmanager
def output_dir(path: Path):
    """Create `path` (parents too); if the body raises and this call created it, remove it again.

    A directory that existed before is never removed (it may hold earlier results)."""
    path = Path(path)
    created = not path.exists()
    path.mkdir(parents=True, exist_ok=True)
    try:
        yield path
    except BaseException:
        if created:
            shutil.rmtree(path, ignore_errors=True)
        raise
