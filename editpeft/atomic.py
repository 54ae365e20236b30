"""Atomic writes: a file or folder is written next to its destination under a temporary name,
then renamed into place, so a reader never sees it half written and an interruption leaves the
previous version (or nothing) behind. Folders that users own (an adapter's, an editor's) are
written file by file with :func:`write_folder_files`, under an advisory lock that readers share
(:func:`folder_lock`): nothing else in the folder is touched, and two writers never interleave.

Example:
    >>> write_folder_files("edits/eiffel", {"edit_config.json": b"{}"}, own={"edit_config.json"})  # doctest: +SKIP
    >>> write_text(run_dir / "summary.json", json.dumps(summary))                # doctest: +SKIP
    >>> with atomic_dir(Path("edits/eiffel")) as tmp:                             # doctest: +SKIP
    ...     (tmp / "edit_config.json").write_text(...)
"""
from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Collection, Iterator, Mapping

try:
    import fcntl
except ImportError:  # pragma: no cover  (Windows: no advisory locks)
    fcntl = None


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


# -- folders shared with other files and other processes ----------------------------------------
#: The lock file inside a folder editpeft writes (advisory: writers exclusive, readers shared).
LOCK_NAME = ".editpeft.lock"
#: Prefix of the temporary files a save writes next to their final names.
TMP_PREFIX = ".editpeft-tmp-"


@contextmanager
def folder_lock(folder: str | os.PathLike, *, shared: bool) -> Iterator[None]:
    """Hold the folder's lock: exclusive for a writer (the lock file is created), shared for a
    reader (only when the lock file exists: folders editpeft never wrote, such as a read-only HF
    cache snapshot, are read without one). A no-op where ``fcntl`` is missing (Windows)."""
    path = Path(folder) / LOCK_NAME
    if fcntl is None or (shared and not path.is_file()):
        yield
        return
    with open(path, "rb" if shared else "ab") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_SH if shared else fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def write_target(path: str | os.PathLike) -> Path:
    """The folder a save into ``path`` writes: ``path`` itself, or, when ``path`` is a symbolic
    link to a folder, the folder it points to (the link is written through, never replaced).
    Raises NotADirectoryError for a file or a link to something else, FileNotFoundError for a
    dangling link."""
    dest = Path(path)
    if dest.is_symlink():
        target = dest.resolve()
        if not target.exists():
            raise FileNotFoundError(f"{str(dest)!r} is a link to {str(target)!r}, which does not exist")
        dest = target
    if dest.exists() and not dest.is_dir():
        raise NotADirectoryError(f"{str(dest)!r} exists and is not a folder")
    return dest


def write_folder_files(path: str | os.PathLike, files: Mapping[str, bytes], *, own: Collection[str],
                       overwrite: bool = False, remove: Collection[str] = ()) -> Path:
    """Write ``files`` (name -> bytes) into the folder ``path`` and return it.

    Only the folder's ``own`` file names (plus the lock and temporary files) may be there already;
    anything else is refused (FileExistsError naming it) unless ``overwrite``, and is never touched.
    Under the folder's exclusive lock, each file is written to a temporary name, flushed, then
    renamed into place; ``remove`` (own names not written this time) are deleted. Readers holding
    the shared lock (:func:`folder_lock`) see the old set of files or the new one, never a mix;
    an interruption leaves the previous files and no temporary ones."""
    dest = write_target(path)
    created = not dest.exists()
    dest.mkdir(parents=True, exist_ok=True)
    try:
        _write_locked(dest, files, own, overwrite, remove)
    except BaseException:
        if created:      # a failed first save leaves nothing behind
            (dest / LOCK_NAME).unlink(missing_ok=True)
            with contextlib.suppress(OSError):
                dest.rmdir()
        raise
    return dest


def _write_locked(dest: Path, files: Mapping[str, bytes], own: Collection[str], overwrite: bool,
                  remove: Collection[str]) -> None:
    with folder_lock(dest, shared=False):
        foreign = sorted(p.name for p in dest.iterdir()
                         if p.name not in own and p.name != LOCK_NAME and not p.name.startswith(TMP_PREFIX))
        if foreign and not overwrite:
            raise FileExistsError(foreign)
        for stale in dest.glob(TMP_PREFIX + "*"):   # left by an interrupted save (writers hold the lock)
            stale.unlink(missing_ok=True)
        written: list[tuple[str, str]] = []
        try:
            for name, data in files.items():
                fd, tmp = tempfile.mkstemp(prefix=f"{TMP_PREFIX}{name}.", dir=dest)
                os.close(fd)
                written.append((tmp, name))
                write_synced(tmp, data)
            for tmp, name in written:
                os.replace(tmp, dest / name)
            for name in remove:
                if name not in files:
                    (dest / name).unlink(missing_ok=True)
            _sync_dir(dest)
        finally:
            for tmp, _ in written:
                if os.path.exists(tmp):
                    os.remove(tmp)


def _sync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
