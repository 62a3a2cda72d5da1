"""Writing files and folders atomically: the one helper every writer of the package uses.

A folder is built under a temporary sibling name and renamed onto its target only once complete, so a reader (or a
resumed run) sees it whole or not at all; a file is written to a temporary sibling and `os.replace`d. Temporary
names start with `.tmp-` followed by the target's name, so the folder's owner can tell them from its own files.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

TEMP_PREFIX = ".tmp-"


def temporary_sibling(target: str | os.PathLike) -> Path:
    """A new, empty temporary folder beside `target` (same file system, so the final rename is atomic)."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f"{TEMP_PREFIX}{target.name}-", dir=target.parent))


def replace_folder(temp: str | os.PathLike, target: str | os.PathLike) -> Path:
    """Renames the finished folder `temp` onto `target`. A previous `target` is first moved aside and deleted only
    after the rename, so a failure in between leaves the previous folder in place."""
    temp, target = Path(temp), Path(target)
    old = None
    if target.exists():
        old = Path(tempfile.mkdtemp(prefix=f"{TEMP_PREFIX}old-{target.name}-", dir=target.parent))
        os.rename(target, old / "folder")
    try:
        os.rename(temp, target)
    except BaseException:
        if old is not None and not target.exists():
            os.rename(old / "folder", target)  # put the previous folder back
        raise
    finally:
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    return target


@contextmanager
def atomic_folder(target: str | os.PathLike, *, overwrite: bool = False) -> Iterator[Path]:
    """Yields a temporary folder to fill; on success it replaces `target`, on an exception it is removed.

    Raises FileExistsError when `target` exists and `overwrite` is False (checked before and after the work).
    """
    target = Path(target).absolute()
    if target.exists() and not overwrite:
        raise FileExistsError(f"{target} already exists; pass overwrite=True to replace it")
    temp = temporary_sibling(target)
    try:
        yield temp
        if target.exists() and not overwrite:
            raise FileExistsError(f"{target} appeared while writing; pass overwrite=True to replace it")
        replace_folder(temp, target)
    except BaseException:
        shutil.rmtree(temp, ignore_errors=True)
        raise


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Writes `data` to `path` through a temporary sibling file and `os.replace`."""
    path = Path(path)
    handle, temp = tempfile.mkstemp(prefix=f"{TEMP_PREFIX}{path.name}-", dir=path.parent)
    try:
        with os.fdopen(handle, "wb") as file:
            file.write(data)
        os.replace(temp, path)
    except BaseException:
        Path(temp).unlink(missing_ok=True)
        raise
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """`atomic_write_bytes` of UTF-8 text."""
    return atomic_write_bytes(path, text.encode("utf-8"))


__all__ = [
    "TEMP_PREFIX",
    "atomic_folder",
    "atomic_write_bytes",
    "atomic_write_text",
    "replace_folder",
    "temporary_sibling",
]
