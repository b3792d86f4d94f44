"""The anticipated failures of a command: bad input, a missing or unusable file, store or output folder.

``benchmark.cli.main`` catches these (with ``ConfigError``, ``UnknownEntry`` and ``DataError``), prints the message
as one line on stderr and exits with code 2. Anything else is a bug and keeps its traceback, so raise these only for
failures a user can fix, with a message that says what to fix.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


class UsageError(ValueError):
    """Bad input detected by a command (one line on stderr, exit code 2)."""


class CheckpointError(UsageError):
    """A checkpoint that is missing, unreadable (truncated, not a checkpoint) or from an incompatible config."""


class StoreError(UsageError):
    """An MLflow tracking store or Optuna storage that cannot be used (malformed or unreachable URI, unknown run)."""


class OutputError(UsageError):
    """An output folder that cannot be created or written."""


def check_writable_dir(path: str | os.PathLike[str], what: str) -> Path:
    """``path`` as a Path, or :class:`OutputError` if it cannot become a writable folder; creates nothing.

    The nearest existing folder on the way up is probed with a temporary file (removed at once): permission bits
    alone do not tell (root, read-only mounts, /proc).
    """
    folder = Path(path).absolute()
    probe = folder
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not probe.is_dir():
        raise OutputError(f"{what} {path}: {probe} exists and is not a folder")
    try:
        fd, tmp = tempfile.mkstemp(prefix=".write-test-", dir=probe)
    except OSError as err:
        raise OutputError(f"{what} {path}: cannot write in {probe} ({err.strerror or err})") from None
    os.close(fd)
    os.unlink(tmp)
    return folder
