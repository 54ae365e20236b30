"""Which files of an adapter (or editor) folder may be read: regular files inside the folder.

A symbolic link is followed only when it stays inside the folder, or, for a folder inside a
Hugging Face cache snapshot, when it points into that repo's ``blobs`` store (the cache's own
layout: every snapshot file is a link to a blob). A link elsewhere is refused, so a folder cannot
make editpeft read (and, through error messages, reveal) files it was not given.

Example:
    >>> adapter_file(Path("edits/eiffel"), "edit_config.json", AdapterFormatError, "an adapter folder")  # doctest: +SKIP
    PosixPath('edits/eiffel/edit_config.json')
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from .errors import EditError


def as_path(value: Any, what: str) -> Path:
    """``value`` as a Path when it is a str or os.PathLike (not bytes), else an EditError saying
    what ``what`` (e.g. "the adapter folder") must be."""
    if isinstance(value, (str, os.PathLike)) and not isinstance(value, bytes):
        text = os.fspath(value)
        if isinstance(text, str) and text and "\x00" not in text:
            return Path(text)
    raise EditError(f"{what} must be a folder path (str or pathlib.Path){', or a Hub repo id' if 'Hub' in what else ''}, "
                    f"got {type(value).__name__} {str(value)[:40]!r}")


def adapter_file(folder: Path, name: str, error: type[EditError], what: str) -> Path:
    """``folder / name`` (which may not exist) unless it is a link out of ``folder`` or not a
    regular file; then ``error`` is raised naming ``what`` the folder is."""
    path = folder / name
    if path.is_symlink():
        target = path.resolve()
        inside = _is_within(target, folder.resolve()) or _is_within(target, _hf_blobs(folder))
        if not inside:
            raise error(f"{path} is a link to {str(target)!r}, outside {what}; refusing to read it. "
                        "Copy the file into the folder if you meant it")
    if path.exists() and not path.is_file():
        raise error(f"{path} is not a regular file; {what} needs {name} as a file")
    return path


def _is_within(path: Path, root: Path | None) -> bool:
    if root is None:
        return False
    try:
        path.relative_to(root)
        return True
    except ValueError:
        return False


def _hf_blobs(folder: Path) -> Path | None:
    """The ``blobs`` store of the HF cache repo whose snapshot holds ``folder`` (else None)."""
    parts = folder.resolve().parts
    for i in range(len(parts) - 2, 0, -1):
        if parts[i] == "snapshots" and parts[i - 1].startswith(("models--", "datasets--", "spaces--")):
            return Path(*parts[:i]) / "blobs"
    return None
