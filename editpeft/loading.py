"""Building adapters from folders and Hub repos: the read files, the installed method's adapter
class, and nothing else (never unpickled).

Example:
    >>> adapter = load_adapter(resolve_adapter_dir("user/eiffel-in-rome"))        # doctest: +SKIP
"""
from __future__ import annotations

import os
from pathlib import Path

from .adapters import EditAdapter
from .card import check_card
from .errors import AdapterFormatError, MethodNotInstalledError
from .io import CONFIG_NAME, read_adapter_files
from .registry import method_info
from .request import EditRequest


def load_adapter(folder: str | os.PathLike) -> EditAdapter:
    """Build the adapter stored in ``folder`` with its installed method's adapter class."""
    config, tensors = read_adapter_files(folder)
    info = method_info(config["method"])
    if info is None or not info.loaded:
        dist = (config.get("plugin") or {}).get("distribution") or f"the plugin providing {config['method']!r}"
        why = f" (it failed to load: {info.error})" if info is not None else ""
        raise MethodNotInstalledError(f"adapter {str(folder)!r} needs method {config['method']!r}, which is not "
                                      f"installed{why}; install it with: pip install {dist}")
    check_card(Path(folder), config)
    if info.kind != config["kind"]:
        raise AdapterFormatError(f"adapter kind {config['kind']!r} does not match method "
                                 f"{config['method']!r}, which makes {info.kind!r} adapters")
    try:
        requests = [EditRequest.from_dict(r) for r in config["requests"]]
    except Exception as e:
        raise AdapterFormatError(f"bad request in {CONFIG_NAME}: {e}") from None
    adapter = info.cls.loader_class().from_saved(
        tensors, config.get("extra") or {}, method=config["method"], hparams=config["hparams"],
        requests=requests, targets=list(config["targets"]))
    adapter.name = config.get("name")
    adapter.base_model = config.get("base_model") or {}
    adapter.plugin = config.get("plugin") or {}
    adapter.metrics = config.get("metrics") or {}
    adapter.editor = config.get("editor") or {}
    return adapter


def resolve_adapter_dir(path_or_repo: str | os.PathLike, *, revision: str | None = None,
                        subfolder: str | None = None) -> Path:
    """A local adapter folder for a path, or for a Hub repo id (downloaded into the HF cache)."""
    local = Path(path_or_repo)
    if subfolder:
        local = local / subfolder
    if local.exists():
        return local
    text = str(path_or_repo)
    if text.count("/") == 1 and not text.startswith((".", "/")):
        from .hub import download_adapter
        return download_adapter(text, revision=revision, subfolder=subfolder)
    raise AdapterFormatError(f"{text!r} is neither an adapter folder nor a Hub repo id ('user/repo')")
