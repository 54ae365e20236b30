"""The adapter folder: ``edit_config.json`` + ``edit_model.safetensors`` + ``README.md``.

Writes are atomic (a sibling temporary folder renamed into place). Reading parses JSON and
safetensors only and verifies the tensors' hash; building an adapter from what was read (which
needs the method registry) is :mod:`editpeft.loading`'s job.

Example:
    >>> adapter.save_pretrained("edits/eiffel")                  # doctest: +SKIP
    >>> config, tensors = read_adapter_files("edits/eiffel")     # doctest: +SKIP
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors_bytes
from safetensors.torch import save as save_safetensors_bytes

from .atomic import folder_lock, write_folder_files
from .errors import AdapterFormatError, EditError
from .safe_paths import adapter_file
from .schema import FORMAT, SHA256_HEX  # FORMAT re-exported

if TYPE_CHECKING:  # pragma: no cover
    from .adapters import EditAdapter

CONFIG_NAME = "edit_config.json"
WEIGHTS_NAME = "edit_model.safetensors"
README_NAME = "README.md"


def editpeft_version() -> str:
    from . import __version__
    return __version__


def adapter_config(adapter: "EditAdapter", tensors_sha256: str) -> dict[str, Any]:
    return {
        "format": FORMAT,
        "name": adapter.name,
        "method": adapter.method,
        "kind": adapter.kind,
        "plugin": adapter.plugin,
        "editpeft_version": editpeft_version(),
        "base_model": adapter.base_model,
        "targets": adapter.targets,
        "hparams": adapter.hparams,
        "requests": [r.to_dict() for r in adapter.requests],
        "extra": adapter.extra_config(),
        "tensors_sha256": tensors_sha256,
        "metrics": adapter.metrics,
        **({"editor": adapter.editor} if getattr(adapter, "editor", None) else {}),
    }


#: The files an adapter folder consists of (and the only ones a save writes or replaces).
ADAPTER_FILES = (CONFIG_NAME, WEIGHTS_NAME, README_NAME)


def save_adapter(adapter: "EditAdapter", path: str | os.PathLike, *, readme: bool = True,
                 overwrite: bool = False) -> str:
    """Write ``adapter`` into folder ``path``; returns the folder path.

    The folder may be new, empty, or hold an adapter (its files are replaced); a folder holding
    anything else is refused unless ``overwrite=True``, which writes the adapter's three files next
    to the others and leaves those untouched. A link to a folder is written through. Files are
    replaced under the folder's lock, so readers and concurrent writers see one whole adapter.
    The config is validated before anything is written: a save never produces a folder that
    would not load.
    """
    from .card import render_model_card
    from .safe_paths import as_path
    from .schema import validate_adapter_config
    path = as_path(path, "the folder to save the adapter in")
    blob = save_safetensors_bytes({k: v.detach().cpu().contiguous() for k, v in adapter.state_dict().items()})
    config = adapter_config(adapter, hashlib.sha256(blob).hexdigest())
    try:
        validate_adapter_config(json.loads(json.dumps(config)))
    except AdapterFormatError as e:
        raise AdapterFormatError(f"this adapter cannot be saved: {getattr(e, 'problem', e)}. Adapters made by "
                                 "model.add_edit or load_edit carry everything needed") from None
    files = {WEIGHTS_NAME: blob, CONFIG_NAME: json.dumps(config, indent=2, ensure_ascii=False).encode()}
    if readme:
        files[README_NAME] = render_model_card(config).encode()
    try:
        dest = write_folder_files(path, files, own=ADAPTER_FILES, overwrite=overwrite, remove=ADAPTER_FILES)
    except FileExistsError as e:
        names = e.args[0] if e.args and isinstance(e.args[0], list) else []
        raise AdapterFormatError(f"{str(path)!r} holds other files than an adapter's ({', '.join(names[:5])}"
                                 f"{', ...' if len(names) > 5 else ''}); save into a new or empty folder, or pass "
                                 "overwrite=True to write the adapter's files next to them (they are kept)") from None
    except (NotADirectoryError, FileNotFoundError) as e:
        raise AdapterFormatError(f"cannot save the adapter there: {e}; choose a folder path") from None
    except OSError as e:
        raise AdapterFormatError(f"saving the adapter to {str(path)!r} failed ({e.strerror or e}); nothing was "
                                 "changed there") from None
    return str(dest)


#: Largest config file read (a real one is a few KB per request; larger is refused, not parsed).
MAX_CONFIG_BYTES = 64 * 1024 * 1024
#: Largest tensors file read.
MAX_TENSOR_BYTES = 64 * 1024 ** 3


def _read_capped(path: Path, limit: int, error: type[EditError]) -> bytes:
    size = path.stat().st_size
    if size > limit:
        raise error(f"{path} is {size:,} bytes, more than editpeft reads ({limit:,}); it is not an adapter file")
    return path.read_bytes()


def read_verified_folder(folder: str | os.PathLike, *, config_name: str, weights_name: str, fmt: str,
                         required: Sequence[str], error: type[EditError], what: str,
                         how_to_fix: str, validate: Callable[[Any], Any] | None = None) -> tuple[dict[str, Any], dict]:
    """Read and verify ``folder``'s JSON config and safetensors: files inside the folder, the
    config (``validate`` if given, else its format and ``required`` fields), then the tensors'
    sha256, which must be recorded. Any problem raises ``error`` naming ``what`` the folder is."""
    folder = Path(folder)
    if not folder.is_dir():
        raise error(f"{str(folder)!r} is not {what} (it does not exist)")
    with folder_lock(folder, shared=True):        # a concurrent save never shows us half its files
        return _read_verified(folder, config_name, weights_name, fmt, required, error, what, how_to_fix, validate)


def _read_verified(folder: Path, config_name: str, weights_name: str, fmt: str, required: Sequence[str],
                   error: type[EditError], what: str, how_to_fix: str,
                   validate: Callable[[Any], Any] | None) -> tuple[dict[str, Any], dict]:
    cfg_path, w_path = (adapter_file(folder, n, error, what) for n in (config_name, weights_name))
    for p in (cfg_path, w_path):
        if not p.is_file():
            raise error(f"{p.name} is missing from {str(folder)!r}; {what} needs {config_name} and "
                        f"{weights_name} ({how_to_fix})")
    try:
        config = json.loads(_read_capped(cfg_path, MAX_CONFIG_BYTES, error))
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
        raise error(f"{cfg_path} is not valid JSON ({str(e)[:200]}); the file is corrupt") from None
    if validate is not None:
        validate(config)
    else:
        if not isinstance(config, dict) or config.get("format") != fmt:
            found = config.get("format") if isinstance(config, dict) else None
            raise error(f"{cfg_path} is not a {fmt} config (format={str(found)[:80]!r})")
        for key in required:
            if key not in config:
                raise error(f"{cfg_path} lacks the field {key!r}; the file is corrupt")
    recorded = config.get("tensors_sha256")
    if not isinstance(recorded, str) or not SHA256_HEX.fullmatch(recorded):
        raise error(f"{cfg_path} records no valid tensors_sha256, so its tensors cannot be verified; the "
                    f"file is corrupt or was modified ({how_to_fix})")
    blob = _read_capped(w_path, MAX_TENSOR_BYTES, error)
    if recorded != hashlib.sha256(blob).hexdigest():
        raise error(f"{w_path} does not match the hash recorded in {config_name}: the tensors are corrupt or "
                    f"were modified ({how_to_fix})")
    try:
        tensors = load_safetensors_bytes(blob)
    except (SafetensorError, ValueError, RuntimeError, OverflowError) as e:
        raise error(f"{w_path} is not a valid safetensors file ({str(e)[:200]})") from None
    return config, tensors


def read_adapter_files(folder: str | os.PathLike) -> tuple[dict[str, Any], dict]:
    """Read and verify the config and tensors of an adapter folder (no model needed)."""
    from .schema import validate_adapter_config
    return read_verified_folder(folder, config_name=CONFIG_NAME, weights_name=WEIGHTS_NAME, fmt=FORMAT,
                                required=(), error=AdapterFormatError, what="an adapter folder",
                                how_to_fix="download it again (force_download=True for a Hub repo) or save "
                                "it again with save_pretrained", validate=validate_adapter_config)


def save_metrics(folder: str | os.PathLike, metrics: dict[str, Any]) -> None:
    """Record measured ``metrics`` in a saved adapter's config and model card (tensors untouched)."""
    from .card import render_model_card
    folder = Path(folder)
    config, _ = read_adapter_files(folder)
    config["metrics"] = dict(metrics)
    card = render_model_card(config)        # rendered first: a failure here writes nothing
    write_folder_files(folder, {CONFIG_NAME: json.dumps(config, indent=2, ensure_ascii=False).encode(),
                                README_NAME: card.encode()}, own=ADAPTER_FILES, overwrite=True)
