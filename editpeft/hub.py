"""Hugging Face Hub push/pull of adapter folders, with the real ``huggingface_hub`` client.

A repo holds one adapter at its root, or several in sub-folders (``subfolder=`` picks one).
Downloads go through the Hugging Face cache, so ``HF_HUB_OFFLINE=1`` loads what was fetched
before. Nothing downloaded is executed or unpickled: the folder is read as JSON + safetensors.

Example:
    >>> adapter.push_to_hub("user/eiffel-in-rome")                          # doctest: +SKIP
    >>> push_folder("edits/gold", "user/my-edits", subfolder="gold")        # doctest: +SKIP
    >>> model.load_edit("user/my-edits", subfolder="gold", revision="main")  # doctest: +SKIP
"""
from __future__ import annotations

import logging
import os
import re
import tempfile
from contextlib import contextmanager
from pathlib import Path, PurePosixPath
from typing import Iterator, Sequence

from .errors import AdapterFormatError, EditError

logger = logging.getLogger(__name__)

#: Seconds editpeft waits for the Hub: to connect, and for each read. ``EDITPEFT_HUB_TIMEOUT``
#: sets the read timeout (the connect timeout is the smaller of 10 s and it).
DEFAULT_READ_TIMEOUT = 60.0
DEFAULT_CONNECT_TIMEOUT = 10.0
_REPO_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,95}/[A-Za-z0-9][A-Za-z0-9._-]{0,95}")


def hub_timeouts() -> tuple[float, float]:
    """(connect, read) seconds for Hub requests (see ``EDITPEFT_HUB_TIMEOUT``)."""
    text = os.environ.get("EDITPEFT_HUB_TIMEOUT")
    try:
        read = float(text) if text else DEFAULT_READ_TIMEOUT
    except ValueError:
        raise EditError(f"EDITPEFT_HUB_TIMEOUT must be a number of seconds, got {text!r}") from None
    if not read > 0:
        raise EditError(f"EDITPEFT_HUB_TIMEOUT must be positive, got {text!r}")
    return min(DEFAULT_CONNECT_TIMEOUT, read), read


@contextmanager
def bounded_hub_requests() -> Iterator[float]:
    """Inside the block every Hub request that has no timeout of its own gets editpeft's (the
    client huggingface_hub shares has none, so a Hub that accepts a connection and never answers
    would hang the call). Yields the read timeout; the shared client is left as it was."""
    from huggingface_hub import get_session
    connect, read = hub_timeouts()

    def bound(request) -> None:
        t = request.extensions.get("timeout") or {}
        request.extensions["timeout"] = {"connect": t.get("connect") or connect, "read": t.get("read") or read,
                                         "write": t.get("write") or read, "pool": t.get("pool") or connect}
    hooks = get_session().event_hooks["request"]
    hooks.append(bound)
    try:
        yield read
    finally:
        if bound in hooks:
            hooks.remove(bound)


def check_repo_id(repo_id: str) -> str:
    """``repo_id`` if it is a Hub model repo id (``user/repo``), else a clear EditError."""
    if not isinstance(repo_id, str) or not _REPO_ID.fullmatch(repo_id) or ".." in repo_id \
            or repo_id.endswith((".git", ".")) or "--" in repo_id:
        raise EditError(f"{str(repo_id)[:80]!r} is not a valid Hub repo id: use 'user/repo' (letters, digits, "
                        "'-', '_' and '.', each part starting with a letter or digit)")
    return repo_id


def check_subfolder(subfolder: str | None) -> str | None:
    """A relative folder path inside a repo or folder (no absolute path, no '..', no backslash)."""
    if subfolder is None or subfolder == "":
        return None
    parts = PurePosixPath(subfolder).parts if isinstance(subfolder, str) else ()
    if not isinstance(subfolder, str) or "\\" in subfolder or "\x00" in subfolder or not parts \
            or subfolder.startswith("/") or any(p in ("..", ".") for p in parts) or ":" in parts[0]:
        raise EditError(f"subfolder {str(subfolder)[:80]!r} must be a relative path inside the repo or folder "
                        "(no leading '/', no '..')")
    return "/".join(parts)


def folder_inside(root: Path, subfolder: str | None) -> Path:
    """``root / subfolder``, refused unless it resolves inside ``root`` (links included)."""
    sub = check_subfolder(subfolder)
    folder = root / sub if sub else root
    try:
        folder.resolve().relative_to(root.resolve())
    except ValueError:
        raise EditError(f"subfolder {subfolder!r} leads outside {str(root)!r}; refusing to read it") from None
    return folder


def push_folder(folder: str | Path, repo_id: str, *, subfolder: str | None = None, private: bool | None = None,
                commit_message: str | None = None, token: str | None = None) -> str:
    """Upload a saved adapter folder (verified first) to ``repo_id``; returns the commit URL."""
    from .io import ADAPTER_FILES, read_adapter_files
    config, _ = read_adapter_files(folder)   # never publish a corrupt folder
    message = commit_message or f"Add {config['method']} edit {config.get('name') or ''}".strip()
    return upload(folder, repo_id, files=ADAPTER_FILES, subfolder=subfolder, private=private,
                  commit_message=message, token=token)


def upload(folder: str | Path, repo_id: str, *, files: Sequence[str], subfolder: str | None = None,
           private: bool | None = None, commit_message: str, token: str | None = None) -> str:
    """Create ``repo_id`` if needed and upload the ``files`` of ``folder`` (an already verified
    folder) and nothing else in it; returns the commit URL."""
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError
    check_repo_id(repo_id)
    subfolder = check_subfolder(subfolder)
    skipped = sorted(p.name for p in Path(folder).iterdir() if p.name not in files)
    if skipped:
        logger.info("not uploading %s: only the files of the artefact (%s) are pushed", ", ".join(skipped),
                    ", ".join(files))
    api = HfApi(token=token)
    try:
        with bounded_hub_requests():
            api.create_repo(repo_id, private=private, exist_ok=True)
            info = api.upload_folder(repo_id=repo_id, folder_path=str(folder), path_in_repo=subfolder or "",
                                     commit_message=commit_message, allow_patterns=list(files))
    except HfHubHTTPError as e:
        raise EditError(f"pushing to {repo_id!r} failed: {e}") from None
    except Exception as e:
        raise _network_error(e, f"pushing to {repo_id!r}", seconds_hint=hub_timeouts()[1]) from None
    return str(getattr(info, "commit_url", info))


def _forget_cached_snapshot(repo_id: str, revision: str | None, allow_patterns: list[str] | None) -> None:
    """Remove the cached snapshot folder of ``repo_id`` at ``revision`` (its links, not the blobs),
    so that a forced download re-links every file: huggingface_hub's own ``force_download``
    downloads the file again but can leave the snapshot's link on the old (corrupt) blob."""
    import shutil
    from huggingface_hub import snapshot_download
    try:
        cached = Path(snapshot_download(repo_id, revision=revision, allow_patterns=allow_patterns,
                                        local_files_only=True))
    except Exception:   # nothing cached (or an incomplete entry): nothing to forget
        return
    if cached.parent.name == "snapshots":
        shutil.rmtree(cached, ignore_errors=True)


def _caused_by_timeout(error: BaseException) -> bool:
    seen = 0
    while error is not None and seen < 10:
        if "Timeout" in type(error).__name__:
            return True
        error, seen = error.__cause__ or error.__context__, seen + 1
    return False


def _network_error(e: Exception, doing: str, seconds_hint: float) -> Exception:
    """An EditError for a transport failure (timeouts, cut connections), else ``e`` itself."""
    name = type(e).__name__
    if "Timeout" in name:
        return EditError(f"{doing} failed: the Hub did not answer within {seconds_hint:g} s; try again, or set "
                         "EDITPEFT_HUB_TIMEOUT to wait longer")
    if isinstance(e, OSError) or type(e).__module__.startswith(("httpx", "httpcore")):
        return EditError(f"{doing} failed (network: {e}); nothing was changed, try again")
    return e


def push_adapter(adapter, repo_id: str, *, subfolder: str | None = None, private: bool | None = None,
                 commit_message: str | None = None, token: str | None = None) -> str:
    """Save ``adapter`` to a temporary folder and push it (see :func:`push_folder`)."""
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "adapter"
        adapter.save_pretrained(str(folder))
        return push_folder(folder, repo_id, subfolder=subfolder, private=private,
                           commit_message=commit_message or f"Add {adapter.method} edit {adapter.name}", token=token)


def download_adapter(repo_id: str, *, revision: str | None = None, subfolder: str | None = None,
                     force_download: bool = False) -> Path:
    """The local folder (in the HF cache) of the adapter in ``repo_id`` (``subfolder`` of it, which
    must stay inside the downloaded snapshot). ``force_download`` fetches the files again even if
    the cache has them (after the Hub once served a corrupt file)."""
    subfolder = check_subfolder(subfolder)
    patterns = [f"{subfolder}/*"] if subfolder else ["*.json", "*.safetensors", "*.md", "*/edit_config.json"]
    root = snapshot(repo_id, revision=revision, allow_patterns=patterns, force_download=force_download)
    folder = folder_inside(root, subfolder)
    if subfolder and not folder.is_dir():
        raise AdapterFormatError(f"Hub repo {repo_id!r} has no adapter folder {subfolder!r}")
    if not subfolder and not (folder / "edit_config.json").is_file():
        names = sorted(p.parent.name for p in root.glob("*/edit_config.json"))
        if names:
            raise AdapterFormatError(f"Hub repo {repo_id!r} holds several adapters ({', '.join(names)}); "
                                     "choose one with subfolder=NAME (CLI: REPO --subfolder NAME)")
        raise AdapterFormatError(f"Hub repo {repo_id!r} holds no editpeft adapter (no edit_config.json)")
    return folder


def snapshot(repo_id: str, *, revision: str | None = None, allow_patterns: list[str] | None = None,
             force_download: bool = False) -> Path:
    """``snapshot_download`` into the HF cache (offline: from it), with editpeft's error messages
    and timeouts (:func:`bounded_hub_requests`)."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError,
                                        RevisionNotFoundError)
    check_repo_id(repo_id)
    if revision is not None and (not isinstance(revision, str) or not revision or len(revision) > 256
                                 or any(c in revision for c in "\n\r\x00")):
        raise EditError(f"revision {str(revision)[:40]!r} is not a branch, tag or commit name")
    try:
        with bounded_hub_requests():
            if force_download:
                _forget_cached_snapshot(repo_id, revision, allow_patterns)
            return Path(snapshot_download(repo_id, revision=revision, allow_patterns=allow_patterns,
                                          force_download=force_download))
    except RepositoryNotFoundError:
        raise EditError(f"Hub repo {repo_id!r} does not exist or is private (log in with `hf auth login`)") from None
    except RevisionNotFoundError:
        raise EditError(f"Hub repo {repo_id!r} has no revision {revision!r}") from None
    except LocalEntryNotFoundError as e:
        if _caused_by_timeout(e):
            raise EditError(f"downloading {repo_id!r} failed: the Hub did not answer within {hub_timeouts()[1]:g} s "
                            "and the local cache does not have it; try again, or set EDITPEFT_HUB_TIMEOUT to wait "
                            "longer") from None
        raise EditError(f"{repo_id!r} is not in the local Hugging Face cache and the Hub cannot be "
                        "reached (HF_HUB_OFFLINE or no network)") from None
    except HfHubHTTPError as e:
        raise EditError(f"downloading {repo_id!r} failed: {e}") from None
    except EditError:
        raise
    except Exception as e:  # timeouts, connection resets, truncated transfers (httpx errors are not OSErrors)
        error = _network_error(e, f"downloading {repo_id!r}", seconds_hint=hub_timeouts()[1])
        if error is e:
            raise
        raise error from None
