"""Building adapters from folders and Hub repos: the read files, the installed method's adapter
class, and nothing else (never unpickled).

Example:
    >>> adapter = load_adapter(resolve_adapter_dir("user/eiffel-in-rome"))        # doctest: +SKIP
"""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import torch

from .adapters import EditAdapter
from .atomic import folder_lock
from .card import check_card, read_card
from .errors import AdapterFormatError, EditError, MethodNotInstalledError
from .io import editpeft_version, read_adapter_files
from .registry import MethodInfo, method_info
from .request import EditRequest
from .safe_paths import as_path
from .schema import request_objects

logger = logging.getLogger(__name__)


def load_adapter(folder: str | os.PathLike, *, allow_mismatch: bool = False) -> EditAdapter:
    """Build the adapter stored in ``folder`` with its installed method's adapter class.

    Order of checks: the files (inside the folder, sizes), the config's schema, the tensors' hash,
    the method (installed, same kind, from the plugin distribution that made the adapter unless
    ``allow_mismatch``; its hparams valid), the model card, the requests, then the tensors (finite,
    exactly the ones the adapter kind reads, shapes checked by the kind), its targets (as listed)
    and ``extra`` (no setting the kind does not read).
    """
    with folder_lock(folder, shared=True):       # the files and the card of one save, never a mix
        config, tensors = read_adapter_files(folder)
        card = read_card(Path(folder))
    method = config["method"]
    info = method_info(method)
    if info is None or not info.loaded:
        why = f" (it failed to load: {info.error})" if info is not None else ""
        raise MethodNotInstalledError(f"adapter {str(folder)!r} needs method {method!r}, which is not installed"
                                      f"{why}; install the plugin that provides it: pip install "
                                      f"{config['plugin']['distribution']}")
    if info.kind != config["kind"]:
        raise AdapterFormatError(f"adapter kind {config['kind']!r} does not match method "
                                 f"{method!r}, which makes {info.kind!r} adapters")
    _check_provenance(config, info, allow_mismatch)
    try:
        info.cls.Config.from_dict(config["hparams"])
    except EditError as e:
        raise AdapterFormatError(f"the adapter's hparams are invalid for method {method!r} ({e}); the file is "
                                 "corrupt or was modified") from None
    check_card(Path(folder), config, card)
    requests = request_objects(config, EditRequest.from_dict)
    _check_finite_tensors(tensors)
    try:
        adapter = info.cls.loader_class().from_saved(
            tensors, config.get("extra") or {}, method=method, hparams=config["hparams"],
            requests=requests, targets=list(config["targets"]))
    except EditError:
        raise
    except Exception as e:   # a plugin's loader tripping over malformed tensors
        raise AdapterFormatError(f"the adapter's tensors do not fit a {method!r} adapter ({type(e).__name__}: "
                                 f"{str(e)[:200]}); the file is corrupt or was modified") from None
    if list(adapter.targets) != config["targets"]:
        raise AdapterFormatError(f"the adapter config lists targets {config['targets'][:4]} but its tensors are for "
                                 f"{list(adapter.targets)[:4]}; the file is corrupt or was modified")
    unknown = sorted(set(config.get("extra") or {}) - set(adapter.extra_config()))
    if unknown:
        raise AdapterFormatError(f"the adapter config's 'extra' holds settings a {method!r} adapter does not read "
                                 f"({', '.join(map(str, unknown[:5]))}); the file is corrupt or was modified")
    unread = sorted(set(tensors) - set(adapter.state_dict()))
    if unread:
        raise AdapterFormatError(f"the adapter file holds tensors its config does not account for "
                                 f"({', '.join(unread[:5])}{', ...' if len(unread) > 5 else ''}); the file was "
                                 "modified or mixed up with another adapter's")
    adapter.name = config.get("name")
    adapter.base_model = dict(config["base_model"])
    adapter.plugin = dict(config["plugin"])
    adapter.metrics = config.get("metrics") or {}
    adapter.editor = config.get("editor") or {}
    return adapter


def _check_finite_tensors(tensors: dict[str, torch.Tensor]) -> None:
    for key, t in tensors.items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise AdapterFormatError(f"tensor {key!r} contains NaN or inf; the adapter file is corrupt or "
                                     "was modified")
        if t.dtype in (torch.bool, torch.complex64, torch.complex128) or t.is_complex():
            raise AdapterFormatError(f"tensor {key!r} has dtype {t.dtype}, which no editpeft adapter stores")


def _check_provenance(config: dict[str, Any], info: MethodInfo, allow_mismatch: bool) -> None:
    """Refuse a method provided here by another plugin distribution than the one that made the
    adapter (unless ``allow_mismatch``: then a warning); warn when the plugin or editpeft here is
    older than the one that made it."""
    plugin = config["plugin"]
    if info.distribution and plugin["distribution"] != info.distribution:
        if not allow_mismatch:
            raise MethodNotInstalledError(
                f"the adapter was made by method {config['method']!r} of plugin {plugin['distribution']!r}, but "
                f"here {config['method']!r} comes from {info.distribution!r}; install {plugin['distribution']!r}, "
                "or pass allow_mismatch=True to read it with the installed plugin")
        logger.warning("adapter method %r was made with plugin %r but is provided here by %r; the tensors are "
                       "read by the installed plugin", config["method"], plugin["distribution"], info.distribution)
    elif info.version and plugin.get("version") and _older(info.version, plugin["version"]):
        logger.warning("adapter was made with %s %s; %s is installed here (upgrade it if loading or appending "
                       "fails)", plugin["distribution"], plugin["version"], info.version)
    if _older(editpeft_version(), config["editpeft_version"]):
        logger.warning("adapter was made with editpeft %s; this is editpeft %s (upgrade it if loading or "
                       "appending fails)", config["editpeft_version"], editpeft_version())


def _older(installed: str, recorded: str) -> bool:
    from packaging.version import InvalidVersion, Version
    try:
        return Version(installed) < Version(recorded)
    except InvalidVersion:
        return False


def resolve_adapter_dir(path_or_repo: str | os.PathLike, *, revision: str | None = None,
                        subfolder: str | None = None, force_download: bool = False) -> Path:
    """A local adapter folder for a path, or for a Hub repo id (downloaded into the HF cache);
    ``subfolder`` must stay inside the folder or the downloaded snapshot. ``force_download``
    fetches a Hub repo's files again even if the cache has them."""
    from .hub import download_adapter, folder_inside
    local = as_path(path_or_repo, "an adapter to load (a folder or Hub repo id 'user/repo')")
    if local.exists():
        return folder_inside(local, subfolder)
    text = str(path_or_repo)
    if text.count("/") == 1 and not text.startswith((".", "/")):
        return download_adapter(text, revision=revision, subfolder=subfolder, force_download=force_download)
    raise AdapterFormatError(f"{text[:200]!r} is neither an adapter folder nor a Hub repo id ('user/repo')")
