"""Discovery of editing methods through the ``editpeft.methods`` entry-point group.

Built-in methods are registered exactly like third-party ones; the core never imports a plugin
by name. A plugin that fails to import is reported (``editpeft methods --verbose``), never fatal.

Example:
    >>> editpeft.list_methods()["rome"]            # doctest: +SKIP
    ('weight_delta', 'editpeft', '0.1.0')
"""
from __future__ import annotations

import logging
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator
from importlib.metadata import entry_points

from .errors import UnknownMethodError
from .adapters import KINDS
from .method import EditMethod

logger = logging.getLogger(__name__)
GROUP = "editpeft.methods"


@dataclass(frozen=True)
class MethodInfo:
    name: str
    kind: str | None
    distribution: str | None
    version: str | None
    target: str
    error: str | None = None
    cls: type[EditMethod] | None = None

    @property
    def loaded(self) -> bool:
        return self.error is None


#: Methods registered in this process by :func:`registered` (tests, notebooks), by name.
_IN_PROCESS: dict[str, MethodInfo] = {}


@contextmanager
def registered(cls: type[EditMethod], *, distribution: str = "in-process") -> Iterator[type[EditMethod]]:
    """Make method class ``cls`` available as ``cls.name`` inside the block, as if a plugin had
    registered it (for testing a method before packaging it; see :mod:`editpeft.testing`).

    Example:
        >>> with registered(MyMethod):                                # doctest: +SKIP
        ...     model.add_edit(MyMethod.name, request)
    """
    if not (isinstance(cls, type) and issubclass(cls, EditMethod)) or not cls.name:
        raise TypeError(f"{cls!r} is not an EditMethod subclass with a name")
    if cls.kind not in KINDS:
        raise TypeError(f"{cls.__name__} has unknown kind {cls.kind!r}; kinds: {', '.join(KINDS)}")
    previous = _IN_PROCESS.get(cls.name)
    _IN_PROCESS[cls.name] = MethodInfo(cls.name, cls.kind, distribution, None, f"{cls.__module__}:{cls.__qualname__}",
                                       cls=cls)
    try:
        yield cls
    finally:
        if previous is None:
            _IN_PROCESS.pop(cls.name, None)
        else:
            _IN_PROCESS[cls.name] = previous


#: The last entry-point scan (name -> info); lookups of a known name reuse it, unknown names rescan.
_SCANNED: dict[str, MethodInfo] | None = None


def discover() -> dict[str, MethodInfo]:
    """Scan the entry points now (a plugin installed a moment ago is found), plus the methods
    registered in this process with :func:`registered` (which take precedence)."""
    global _SCANNED
    _SCANNED = _scan()
    return {**_SCANNED, **_IN_PROCESS}


def _lookup(name: str) -> tuple[MethodInfo | None, dict[str, MethodInfo]]:
    """The info of method ``name`` from the last scan, rescanning when it is not known there
    (scanning costs tens of milliseconds; loading an adapter looks its method up several times)."""
    if name in _IN_PROCESS:
        return _IN_PROCESS[name], {}
    if _SCANNED is None or name not in _SCANNED or not _SCANNED[name].loaded:
        infos = discover()
        return infos.get(name), infos
    return _SCANNED[name], {}


def _scan() -> dict[str, MethodInfo]:
    found: dict[str, MethodInfo] = {}
    for ep in entry_points(group=GROUP):
        dist = getattr(ep, "dist", None)
        dist_name = dist.name if dist is not None else None
        dist_version = dist.version if dist is not None else None
        try:
            cls = ep.load()
            if not (isinstance(cls, type) and issubclass(cls, EditMethod)):
                raise TypeError(f"{ep.value} is not an editpeft.EditMethod subclass")
            if cls.kind not in KINDS:
                raise TypeError(f"{ep.value} has unknown kind {cls.kind!r}")
            info = MethodInfo(ep.name, cls.kind, dist_name, dist_version, ep.value, cls=cls)
        except Exception as e:  # a broken plugin must not break the others
            logger.warning("editpeft plugin %r (%s) failed to load: %s", ep.name, ep.value, e)
            info = MethodInfo(ep.name, None, dist_name, dist_version, ep.value, error=f"{type(e).__name__}: {e}")
        if ep.name in found and found[ep.name].loaded:
            logger.warning("method %r is registered twice; keeping %s", ep.name, found[ep.name].target)
            continue
        found[ep.name] = info
    return found


def list_methods() -> dict[str, tuple[str, str | None, str | None]]:
    """Installed, loadable methods: name -> (kind, plugin distribution, version)."""
    return {n: (i.kind, i.distribution, i.version) for n, i in sorted(discover().items()) if i.loaded}


def get_method(name: str) -> EditMethod:
    """An instance of the method registered as ``name``."""
    info, infos = _lookup(name)
    if info is None:
        installed = ", ".join(sorted(n for n, i in infos.items() if i.loaded)) or "none"
        raise UnknownMethodError(f"unknown editing method {name!r}; installed methods: {installed}. "
                                 "A method from another plugin needs that plugin installed.")
    if not info.loaded:
        raise UnknownMethodError(f"the plugin providing {name!r} ({info.distribution}) failed to "
                                 f"load: {info.error}")
    return info.cls()


def method_info(name: str) -> MethodInfo | None:
    return _lookup(name)[0]
