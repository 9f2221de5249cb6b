"""moex's error classes: one home, one base.

Every error a user can cause or fix (a bad recipe, bad data, a damaged
checkpoint, a full disk) is a `MoexError`. The CLI prints such an error as one
line, `moex: error: <message>`, and exits 2; `MOEX_DEBUG=1` shows the
traceback. Anything else is a bug in moex and keeps its traceback.

Messages name the key or the file and the cause, so the one line is enough.
"""

from __future__ import annotations

import errno
import os
import shutil
from pathlib import Path


class MoexError(Exception):
    """Base of every error moex reports to the user as one line."""


class ConfigError(MoexError, ValueError):
    """A recipe or override that does not fit the config schema, or a value out of range."""


class DataError(MoexError, ValueError):
    """Bad or missing data: a corrupt file, an unknown character, a split too small."""


class CheckpointError(MoexError):
    """A checkpoint or run directory that cannot be read, or does not fit the current config."""


class TrainingError(MoexError, RuntimeError):
    """The run cannot go on (e.g. a non-finite loss); the last good checkpoint is kept."""


class StorageError(MoexError, OSError):
    """A file could not be written: full disk, read-only file system, no permission."""


class UsageError(MoexError):
    """A command-line combination that makes no sense (e.g. `--resume --fresh`)."""


_STORAGE_CAUSES = {
    errno.ENOSPC: "no space left on device",
    errno.EDQUOT: "disk quota exceeded",
    errno.EROFS: "read-only file system",
    errno.EACCES: "permission denied",
    errno.EPERM: "operation not permitted",
}


def storage_cause(path: str | Path, exc: BaseException | None = None) -> str | None:
    """Why writing under `path` failed ("no space left on device", …), or None if not a storage fault.

    torch.save reports a full disk as an opaque RuntimeError ("[enforce fail at
    inline_container.cc] … file write failed"), so the errno is not always there:
    then the file system itself is asked (free space, read-only flag, permission).
    """
    code = getattr(exc, "errno", None)
    if code in _STORAGE_CAUSES:
        return _STORAGE_CAUSES[code]
    if isinstance(exc, OSError) and code is not None:
        return None  # some other OS error (e.g. file not found): not a storage condition
    p = Path(path)
    while not p.exists() and p != p.parent:
        p = p.parent
    try:
        if shutil.disk_usage(p).free < 1 << 20:
            return "no space left on device"
        if os.statvfs(p).f_flag & os.ST_RDONLY:
            return "read-only file system"
        if not os.access(p if p.is_dir() else p.parent, os.W_OK):
            return "permission denied"
    except OSError:
        return None
    return None


def storage_error(path: str | Path, exc: BaseException, what: str = "write") -> StorageError | None:
    """A `StorageError` naming `path` and the cause when `exc` came from a full/read-only disk, else None."""
    cause = storage_cause(path, exc)
    if cause is None:
        return None
    return StorageError(f"cannot {what} {path}: {cause}")
