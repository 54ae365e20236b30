"""Hugging Face Hub push/pull of adapter folders, with the real ``huggingface_hub`` client."""
from __future__ import annotations

import tempfile
from pathlib import Path

from .errors import AdapterFormatError, EditError


def push_adapter(adapter, repo_id: str, *, private: bool | None = None,
                 commit_message: str | None = None, token: str | None = None) -> str:
    from huggingface_hub import HfApi
    api = HfApi(token=token)
    api.create_repo(repo_id, private=private, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "adapter"
        adapter.save_pretrained(str(folder))
        info = api.upload_folder(repo_id=repo_id, folder_path=str(folder),
                                 commit_message=commit_message or f"Add {adapter.method} edit {adapter.name}")
    return str(getattr(info, "commit_url", info))


def download_adapter(repo_id: str, *, revision: str | None = None, subfolder: str | None = None) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError
    patterns = [f"{subfolder}/*"] if subfolder else None
    try:
        root = Path(snapshot_download(repo_id, revision=revision, allow_patterns=patterns))
    except RepositoryNotFoundError:
        raise EditError(f"Hub repo {repo_id!r} does not exist or is private (log in with `hf auth login`)") from None
    except LocalEntryNotFoundError:
        raise EditError(f"{repo_id!r} is not in the local Hugging Face cache and the Hub cannot be "
                        "reached (HF_HUB_OFFLINE or no network)") from None
    except HfHubHTTPError as e:
        raise EditError(f"downloading {repo_id!r} failed: {e}") from None
    folder = root / subfolder if subfolder else root
    if not folder.is_dir():
        raise AdapterFormatError(f"Hub repo {repo_id!r} has no adapter folder {subfolder!r}")
    return folder
