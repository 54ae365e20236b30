"""Atomic writes: a file or folder is written next to its destination under a temporary name,
then renamed into place, so a reader never sees it half written and an interruption leaves the
previous version (or nothing) behind.

Example:
    >>> write_text(run_dir / "summary.json", json.dumps(summary))                # doctest: +SKIP
    >>> with atomic_dir(Path("edits/eiffel")) as tmp:                             # doctest: +SKIP
    ...     (tmp / "edit_config.json").write_text(...)
"""
from __future__ import annotations

import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


def write_synced(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` in place and flush it to disk (for files inside a temporary folder)."""
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


@contextmanager
def atomic_file(path: str | os.PathLike) -> Iterator[str]:
    """Yield a temporary sibling path to write; on success it replaces ``path``, on failure it is removed."""
    dest = Path(path)
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent)
    os.close(fd)
    try:
        yield tmp
        os.replace(tmp, dest)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Replace the file ``path`` by ``data`` atomically."""
    with atomic_file(path) as tmp:
        write_synced(tmp, data)


def write_text(path: str | os.PathLike, text: str) -> None:
    """Replace the file ``path`` by ``text`` (UTF-8) atomically."""
    write_bytes(path, text.encode("utf-8"))


@contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary sibling folder to fill; on success it replaces the folder ``path`` (an
    existing one is swapped out and deleted only once the new one is in place), on failure it is
    removed and ``path`` is left as it was. Raises NotADirectoryError if ``path`` is a file."""
    dest = Path(path)
    dest.parent.mkdir(parents=True, exist_ok=True)
    if dest.exists() and not dest.is_dir():
        raise NotADirectoryError(f"{str(dest)!r} exists and is not a folder")
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", dir=dest.parent))
    try:
        yield tmp
        _replace_dir(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _replace_dir(src: Path, dest: Path) -> None:
    if not dest.exists():
        os.replace(src, dest)
        return
    backup = Path(tempfile.mkdtemp(prefix=f".{dest.name}.old.", dir=dest.parent))
    os.rmdir(backup)
    os.replace(dest, backup)
    try:
        os.replace(src, dest)
    except BaseException:
        os.replace(backup, dest)
        raise
    shutil.rmtree(backup, ignore_errors=True)
