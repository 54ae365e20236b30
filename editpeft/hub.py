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

import tempfile
from pathlib import Path

from .errors import AdapterFormatError, EditError


def push_folder(folder: str | Path, repo_id: str, *, subfolder: str | None = None, private: bool | None = None,
                commit_message: str | None = None, token: str | None = None) -> str:
    """Upload a saved adapter folder (verified first) to ``repo_id``; returns the commit URL."""
    from .io import read_adapter_files
    config, _ = read_adapter_files(folder)   # never publish a corrupt folder
    message = commit_message or f"Add {config['method']} edit {config.get('name') or ''}".strip()
    return upload(folder, repo_id, subfolder=subfolder, private=private, commit_message=message, token=token)


def upload(folder: str | Path, repo_id: str, *, subfolder: str | None = None, private: bool | None = None,
           commit_message: str, token: str | None = None, ignore_patterns: list[str] | None = None) -> str:
    """Create ``repo_id`` if needed and upload ``folder`` (an already verified folder); returns the commit URL."""
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError
    api = HfApi(token=token)
    try:
        api.create_repo(repo_id, private=private, exist_ok=True)
        info = api.upload_folder(repo_id=repo_id, folder_path=str(folder), path_in_repo=subfolder or "",
                                 commit_message=commit_message, ignore_patterns=ignore_patterns)
    except HfHubHTTPError as e:
        raise EditError(f"pushing to {repo_id!r} failed: {e}") from None
    except OSError as e:
        raise EditError(f"pushing to {repo_id!r} failed (network: {e})") from None
    return str(getattr(info, "commit_url", info))


def push_adapter(adapter, repo_id: str, *, subfolder: str | None = None, private: bool | None = None,
                 commit_message: str | None = None, token: str | None = None) -> str:
    """Save ``adapter`` to a temporary folder and push it (see :func:`push_folder`)."""
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "adapter"
        adapter.save_pretrained(str(folder))
        return push_folder(folder, repo_id, subfolder=subfolder, private=private,
                           commit_message=commit_message or f"Add {adapter.method} edit {adapter.name}", token=token)


def download_adapter(repo_id: str, *, revision: str | None = None, subfolder: str | None = None) -> Path:
    """The local folder (in the HF cache) of the adapter in ``repo_id`` (``subfolder`` of it)."""
    patterns = [f"{subfolder}/*"] if subfolder else ["*.json", "*.safetensors", "*.md", "*/edit_config.json"]
    root = snapshot(repo_id, revision=revision, allow_patterns=patterns)
    folder = root / subfolder if subfolder else root
    if subfolder and not folder.is_dir():
        raise AdapterFormatError(f"Hub repo {repo_id!r} has no adapter folder {subfolder!r}")
    if not subfolder and not (folder / "edit_config.json").is_file():
        names = sorted(p.parent.name for p in root.glob("*/edit_config.json"))
        if names:
            raise AdapterFormatError(f"Hub repo {repo_id!r} holds several adapters ({', '.join(names)}); "
                                     "choose one with subfolder=NAME (CLI: REPO --subfolder NAME)")
        raise AdapterFormatError(f"Hub repo {repo_id!r} holds no editpeft adapter (no edit_config.json)")
    return folder


def snapshot(repo_id: str, *, revision: str | None = None, allow_patterns: list[str] | None = None) -> Path:
    """``snapshot_download`` into the HF cache (offline: from it), with editpeft's error messages."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError,
                                        RevisionNotFoundError)
    try:
        return Path(snapshot_download(repo_id, revision=revision, allow_patterns=allow_patterns))
    except RepositoryNotFoundError:
        raise EditError(f"Hub repo {repo_id!r} does not exist or is private (log in with `hf auth login`)") from None
    except RevisionNotFoundError:
        raise EditError(f"Hub repo {repo_id!r} has no revision {revision!r}") from None
    except LocalEntryNotFoundError:
        raise EditError(f"{repo_id!r} is not in the local Hugging Face cache and the Hub cannot be "
                        "reached (HF_HUB_OFFLINE or no network)") from None
    except HfHubHTTPError as e:
        raise EditError(f"downloading {repo_id!r} failed: {e}") from None
    except OSError as e:   # connection reset, truncated transfer
        raise EditError(f"downloading {repo_id!r} failed (network: {e}); nothing was loaded, try again") from None
    except Exception as e:  # the client's httpx transport errors (a cut connection) are not OSErrors
        if type(e).__module__.startswith(("httpx", "httpcore")):
            raise EditError(f"downloading {repo_id!r} failed (network: {e}); nothing was loaded, try again") from None
        raise
