"""The schema of an adapter's ``edit_config.json``, checked before any tensor is read.

Every field is validated for presence and JSON type; the integrity and provenance fields
(``tensors_sha256``, ``base_model.fingerprint``, ``plugin``, ``editpeft_version``, ``format``) are
required, so that a file cannot switch a check off by leaving its field out or setting it to null
or ``""``. Unknown top-level fields are refused too (a newer format announces itself through
``format``, not through extra keys).

Example:
    >>> validate_adapter_config({"format": "editpeft/2"})
    Traceback (most recent call last):
    ...
    editpeft.errors.AdapterFormatError: this adapter was written by a newer editpeft (format 'editpeft/2'); upgrade editpeft (pip install -U editpeft) to load it
"""
from __future__ import annotations

import re
from typing import Any, Callable, Mapping

from .errors import AdapterFormatError, EditError

#: The one format this version reads.
FORMAT = "editpeft/1"
SHA256_HEX = re.compile(r"[0-9a-f]{64}")
FINGERPRINT = re.compile(r"sha256:[0-9a-f]{64}")
#: A distribution name as PEP 508 allows it (letters, digits, ``._-``; alphanumeric at both ends).
DISTRIBUTION_NAME = re.compile(r"[A-Za-z0-9]([A-Za-z0-9._-]{0,98}[A-Za-z0-9])?")
#: A method (entry-point) name.
METHOD_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
#: A module path in a model (``model.layers.7.mlp.down_proj``).
MODULE_NAME = re.compile(r"[A-Za-z0-9_]+(\.[A-Za-z0-9_]+)*")
#: A PEP 440-ish version string (what editpeft and plugin versions look like).
VERSION = re.compile(r"[0-9A-Za-z][0-9A-Za-z.+!_-]{0,63}")
#: Longest free-text field accepted (an edit name, a base model's name, a licence).
MAX_TEXT = 1024

_Check = Callable[[str, Any], None]


def _fail(where: str, what: str) -> AdapterFormatError:
    error = AdapterFormatError(f"edit_config.json: {where} {what}; the file is corrupt or was modified "
                               "(download it again or save the adapter again with save_pretrained)")
    error.problem = f"{where} {what}"     # the bare finding, for callers that phrase their own advice
    return error


def _type_name(value: Any) -> str:
    return "null" if value is None else {dict: "an object", list: "a list", str: "a string", bool: "a boolean",
                                         int: "an integer", float: "a number"}.get(type(value), type(value).__name__)


def _text(pattern: re.Pattern | None = None, *, optional: bool = False, empty: bool = False,
          max_len: int = MAX_TEXT) -> _Check:
    """A string (``optional``: or null; ``empty``: may be ``""``) of at most ``max_len`` characters
    matching ``pattern``."""
    def check(where: str, value: Any) -> None:
        if value is None and optional:
            return
        if not isinstance(value, str):
            raise _fail(where, f"must be a string, got {_type_name(value)}")
        if not value and not empty:
            raise _fail(where, "must not be empty")
        if not value:
            return
        if len(value) > max_len:
            raise _fail(where, f"is {len(value)} characters long (at most {max_len})")
        if pattern is not None and not pattern.fullmatch(value):
            raise _fail(where, f"is not a valid value ({value[:80]!r})")
    return check


def _object(fields: Mapping[str, tuple[bool, _Check]], *, optional: bool = False, open_: bool = False) -> _Check:
    """An object with ``fields`` (name -> (required, check)); ``open_`` allows other keys."""
    def check(where: str, value: Any) -> None:
        if value is None and optional:
            return
        if not isinstance(value, dict):
            raise _fail(where, f"must be an object, got {_type_name(value)}")
        for key, (required, sub) in fields.items():
            if key in value:
                sub(f"{where}.{key}", value[key])
            elif required:
                raise _fail(where, f"lacks the required field {key!r}")
        if not open_:
            unknown = sorted(set(value) - set(fields))
            if unknown:
                raise _fail(where, f"has unknown field(s) {unknown[:5]}")
    return check


def _any_object(*, optional: bool = False) -> _Check:
    def check(where: str, value: Any) -> None:
        if value is None and optional:
            return
        if not isinstance(value, dict):
            raise _fail(where, f"must be an object, got {_type_name(value)}")
    return check


def _list_of(item: _Check, *, non_empty: bool = False, unique: bool = False) -> _Check:
    def check(where: str, value: Any) -> None:
        if not isinstance(value, list):
            raise _fail(where, f"must be a list, got {_type_name(value)}")
        if non_empty and not value:
            raise _fail(where, "is empty")
        for i, v in enumerate(value):
            item(f"{where}[{i}]", v)
        if unique and len(set(map(str, value))) != len(value):
            raise _fail(where, "lists an entry twice")
    return check


def _version(*, optional: bool = False) -> _Check:
    """A PEP 440 version string (``optional``: or null)."""
    text = _text(VERSION, optional=optional)

    def check(where: str, value: Any) -> None:
        text(where, value)
        if value is None:
            return
        from packaging.version import InvalidVersion, Version
        try:
            Version(value)
        except InvalidVersion:
            raise _fail(where, f"is not a version number ({value[:40]!r})") from None
    return check


def _format(where: str, value: Any) -> None:
    if value == FORMAT:
        return
    newer = re.fullmatch(r"editpeft/(\d+)", value) if isinstance(value, str) else None
    if newer and int(newer.group(1)) > int(FORMAT.split("/")[1]):
        raise AdapterFormatError(f"this adapter was written by a newer editpeft (format {value!r}); upgrade "
                                 "editpeft (pip install -U editpeft) to load it")
    raise AdapterFormatError(f"edit_config.json is not an editpeft adapter config (format is "
                             f"{str(value)[:80]!r}, expected {FORMAT!r}); is this the right folder?")


_BASE_MODEL = _object({
    "name_or_path": (False, _text(optional=True, empty=True)),
    "model_type": (True, _text(re.compile(r"[A-Za-z0-9_.-]+"))),
    "fingerprint": (True, _text(FINGERPRINT)),
    "license": (False, _text(optional=True)),
})
_PLUGIN = _object({
    "distribution": (True, _text(DISTRIBUTION_NAME)),
    "version": (True, _version(optional=True)),
})
_EDITOR = _object({"id": (True, _text()), "sha256": (True, _text(SHA256_HEX))}, open_=True)

#: The top-level fields: name -> (required, check).
ADAPTER_FIELDS: dict[str, tuple[bool, _Check]] = {
    "format": (True, _format),
    "name": (False, _text(optional=True)),
    "method": (True, _text(METHOD_NAME)),
    "kind": (True, _text(re.compile(r"[a-z_]+"))),   # checked against the method's kind on load
    "plugin": (True, _PLUGIN),
    "editpeft_version": (True, _version()),
    "base_model": (True, _BASE_MODEL),
    "targets": (True, _list_of(_text(MODULE_NAME), unique=True)),   # empty for routers
    "hparams": (True, _any_object()),
    "requests": (True, _list_of(_any_object())),
    "extra": (False, _any_object(optional=True)),
    "tensors_sha256": (True, _text(SHA256_HEX)),
    "metrics": (False, _any_object(optional=True)),
    "editor": (False, _EDITOR),
}


def validate_adapter_config(config: Any) -> dict[str, Any]:
    """Return ``config`` if it is a valid adapter config; else raise :class:`AdapterFormatError`
    naming the first bad field. Format is checked first, so a newer format says "upgrade"."""
    if not isinstance(config, dict):
        raise _fail("the top level", f"must be an object, got {_type_name(config)}")
    if "format" not in config:
        raise AdapterFormatError("edit_config.json has no 'format' field: it is not an editpeft adapter config")
    _object(ADAPTER_FIELDS)("config", config)
    return config


def request_objects(config: Mapping[str, Any], parse: Callable[[dict], Any]) -> list[Any]:
    """The config's requests parsed with ``parse`` (EditRequest.from_dict); a bad one is refused."""
    out = []
    for i, r in enumerate(config["requests"]):
        try:
            out.append(parse(r))
        except EditError as e:
            raise _fail(f"config.requests[{i}]", f"is not a valid edit request ({e})") from None
    return out
