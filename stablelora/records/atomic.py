"""Writes a crash cannot tear: a file is written under a temporary name, flushed to the disk,
then renamed over the old one (and the folder entry flushed), so that a kill or a power loss
leaves either the old file or the new one. A leaf module, for every writer of run records."""

from __future__ import annotations

import errno
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

#: Write errors that leave the records whole (every writer replaces its file atomically, so
#: the last good checkpoint stays): what each is, and what frees the run to go on.
FULL_DISK = {
    errno.ENOSPC: ("no space left on device", "free some space"),
    errno.EDQUOT: ("disk quota exceeded", "free some space or raise the quota"),
    errno.EFBIG: (
        "file too large for this process' file-size limit (ulimit -f) or file system",
        "raise the limit (ulimit -f unlimited)",
    ),
}


@contextmanager
def writing(path: Path) -> Iterator[None]:
    """Name ``path`` in an OSError raised without a file name: a ``write()`` or ``close()``
    failing on a full disk, past a quota or past the process' file-size limit (``ulimit -f``)
    names no file, and the runner's one line must say which one could not be written."""
    try:
        yield
    except OSError as error:
        if error.filename is None:
            error.filename = str(path)
        raise


def fsync_folder(folder: Path) -> None:
    """Flush ``folder``'s entries (a rename in it) to the disk, where the file system lets a
    folder be opened."""
    try:
        handle = os.open(folder, os.O_RDONLY)
    except OSError:  # not every file system lets a folder be opened
        return
    try:
        os.fsync(handle)
    finally:
        os.close(handle)


def fsync_replace(tmp: Path, path: Path) -> None:
    """Flush ``tmp`` to the disk, then rename it to ``path`` (and flush the folder entry), so
    that a crash leaves either the old or the new file, never a torn one."""
    with open(tmp, "rb+") as stream:
        os.fsync(stream.fileno())
    os.replace(tmp, path)
    fsync_folder(Path(path).parent)
