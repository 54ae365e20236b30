"""``enable_editing``: gives a transformers model the edit API, on the same object.

Example:
    >>> model = editpeft.enable_editing(model, tokenizer)                         # doctest: +SKIP
    >>> adapter = model.add_edit("rome", EditRequest(prompt="The Eiffel Tower is in",
    ...                          subject="Eiffel Tower", target_new="Rome"), name="eiffel")  # doctest: +SKIP
    >>> with model.disabled_edits(): ...                                           # doctest: +SKIP
    >>> model.remove_edit("eiffel")                                                # doctest: +SKIP
"""
from __future__ import annotations

import functools
import inspect
import logging
import os
from collections import OrderedDict
from contextlib import contextmanager
from types import MappingProxyType
from typing import Any, Iterable, Iterator, Mapping

import torch
from torch import nn

from .adapters import EditAdapter
from .arch import get_arch
from .attach import ModuleSlot
from .caches import ModelCaches
from .routing import RoutingState, routed_forward, routed_generate
from .conflicts import Conflict, find_conflicts
from .errors import BaseModelMismatchError, EditError, EditOptimizationError, InvalidRequestError, MethodFailedError
from .fingerprint import base_model_record, check_base_model, model_fingerprint
from .method import computing
from .registry import get_method, method_info
from .request import EditRequest, as_request_list
from .tokens import check_lengths

logger = logging.getLogger(__name__)


class EditState:
    """Everything editpeft keeps on an editable model: the edits in stack order, the hooked
    module slots, the on/off switch, and the per-model caches (:class:`~editpeft.caches.ModelCaches`)."""

    def __init__(self, model: nn.Module, tokenizer):
        self.model = model
        self.tokenizer = tokenizer
        self.edits: "OrderedDict[str, EditAdapter]" = OrderedDict()
        self.slots: dict[str, ModuleSlot] = {}
        self.enabled = True
        self.caches = ModelCaches()
        self.routing = RoutingState()   # the live routing sessions (editpeft.routing)
        self.strict_conflicts = False

    def module(self, name: str) -> nn.Module:
        """The module ``name``; inside a peft wrapper (LoRA etc.), the wrapped base layer, so edits
        and peft adapters can be active on the same module."""
        try:
            module = self.model.get_submodule(name)
        except AttributeError:
            raise BaseModelMismatchError(f"this model has no module {name!r}; the adapter was made "
                                         "for another architecture") from None
        while isinstance(getattr(module, "base_layer", None), nn.Module):
            module = module.base_layer
        return module

    def slot(self, name: str) -> ModuleSlot:
        if name not in self.slots:
            self.slots[name] = ModuleSlot(self, name, self.module(name))
        return self.slots[name]

    def drop_slot_if_empty(self, name: str) -> None:
        slot = self.slots.get(name)
        if slot is not None and slot.empty:
            del self.slots[name]

    def is_live(self, adapter: EditAdapter) -> bool:
        return self.enabled and adapter.active

    def original_weight(self, name: str) -> torch.Tensor:
        slot = self.slots.get(name)
        if slot is not None and slot.pristine is not None:
            return slot.pristine
        return self.module(name).weight

    def fingerprint(self, targets: Iterable[str]) -> str:
        """Hash of the config and the original weights of ``targets``; a composite target (an MLP
        read by patch neurons) stands for the weighted modules inside it."""
        leaves = []
        for name in targets:
            module = self.module(name)
            if isinstance(getattr(module, "weight", None), torch.Tensor):
                leaves.append(name)
            else:
                leaves += [f"{name}.{sub}" for sub, m in module.named_modules()
                           if sub and isinstance(getattr(m, "weight", None), torch.Tensor)]
        return model_fingerprint(self.model, leaves, self.original_weight)

    def reorder_slots(self) -> None:
        order = {id(a): i for i, a in enumerate(self.edits.values())}
        for slot in self.slots.values():
            slot.sort(order)

    def live_routers(self) -> list[EditAdapter]:
        return [a for a in self.edits.values() if a.kind == "router" and self.is_live(a)]

    def sync_merged(self) -> None:
        """Put into the weights exactly the merged deltas of the live adapters (after a switch)."""
        for slot in list(self.slots.values()):
            slot.sync()

    @contextmanager
    def disabled(self) -> Iterator[None]:
        previous = self.enabled
        self.enabled = False
        self.sync_merged()
        try:
            yield
        finally:
            self.enabled = previous
            self.sync_merged()

    @contextmanager
    def only_live(self, names: Iterable[str]) -> Iterator[None]:
        """Inside the block exactly the edits ``names`` are live (the switch restored afterwards)."""
        keep = set(names)
        previous = (self.enabled, {n: a.active for n, a in self.edits.items()})
        self.enabled = True
        for n, a in self.edits.items():
            a._active = n in keep
        self.sync_merged()
        try:
            yield
        finally:
            self.enabled = previous[0]
            for n, a in self.edits.items():
                a._active = previous[1][n]
            self.sync_merged()


class EditableMixin:
    """Methods added to a transformers model by :func:`enable_editing`."""

    _editpeft: EditState

    @property
    def edit_state(self) -> EditState:
        return self._editpeft

    @property
    def edits(self) -> Mapping[str, EditAdapter]:
        """Ordered, read-only view: edit name -> adapter, in stack order."""
        return MappingProxyType(self._editpeft.edits)

    def add_edit(self, method: str, requests: EditRequest | Iterable[EditRequest], *,
                 name: str | None = None, config: Any = None, append: bool = False,
                 editor: Any = None) -> EditAdapter:
        """Compute an edit with ``method`` and attach it as adapter ``name``.

        ``requests`` is one :class:`EditRequest` or a list (a batch). ``config`` is a dict of
        hyper-parameter overrides, a card path or the method's Config. With ``append=True`` and
        an existing adapter ``name`` of the same method, the requests are added to it (lifelong
        memories such as GRACE). Methods that edit with a trained editor (MEND, KE, SERAC) take
        ``editor=``: an :class:`~editpeft.editors.Editor`, its folder or a Hub repo id; its hparams are
        the default config. If anything fails, the model is left exactly as it was.
        """
        state = self._editpeft
        _check_name(name)
        if not isinstance(method, str):
            raise EditError(f"method must be a method name such as 'rome', got {type(method).__name__}; "
                            "editpeft.list_methods() lists the installed ones")
        reqs = as_request_list(requests)
        impl = get_method(method)
        existing = state.edits.get(name) if name is not None else None
        if existing is not None and not append:
            raise EditError(f"an edit named {name!r} already exists; choose another name, remove it "
                            "first, or pass append=True to add these requests to it")
        if existing is not None and existing.method != impl.name:
            raise EditError(f"cannot append {impl.name!r} edits to {name!r}, a {existing.method!r} adapter")
        name = name or _fresh_name(state, impl.name)
        get_arch(self)  # unsupported families fail before any work
        impl.check_capabilities(self, reqs, appending=existing is not None, has_editor=editor is not None)
        batch = find_conflicts([(f"{name} (request {i})", [r]) for i, r in enumerate(reqs)])
        if batch:
            raise InvalidRequestError("the batch contains contradictory edits: "
                                      + "; ".join(c.describe() for c in batch) + ". Keep one of each pair")
        _report_conflicts(state, name, reqs)
        if existing is not None and (config is None or isinstance(config, Mapping)):
            config = {**existing.hparams, **dict(config or {})}   # continue with the adapter's settings
        trained, extra = None, {}
        if editor is not None or impl.requires_editor:
            from .editors import editor_for_edit
            trained, config = editor_for_edit(impl, self, state.tokenizer, editor, config)
            extra = {"editor": trained}   # passed only to methods that use an editor
        cfg = impl.resolve_config(self, config)
        check_lengths(self, state.tokenizer, reqs)
        try:
            with computing(self):
                if existing is not None:
                    adapter = impl.extend(existing, self, state.tokenizer, reqs, cfg, **extra)
                else:
                    adapter = impl.compute(self, state.tokenizer, reqs, cfg, **extra)
        except EditError:
            raise
        except Exception as e:   # a method's bug or an input it does not handle: still an EditError
            raise MethodFailedError(f"method {impl.name!r} failed ({type(e).__name__}: {str(e)[:300]}); the model "
                                    "was left unchanged. Check the request and config; if they are right, report "
                                    "it to the plugin's authors") from e
        if not isinstance(adapter, EditAdapter) or adapter.kind != impl.kind:
            raise EditError(f"plugin method {impl.name!r} returned {adapter!r}, not a {impl.kind} adapter")
        _check_finite(adapter, impl.name)
        _stamp(adapter, state, impl, cfg, name)
        if trained is not None:
            adapter.editor = trained.provenance()
        if existing is not None:
            _swap(state, name, existing, adapter)
        else:
            _attach(state, name, adapter)
        logger.info("added edit %r (%s, %d request(s))", name, impl.name, len(reqs))
        return adapter

    def remove_edit(self, name: str) -> EditAdapter:
        """Detach edit ``name``; the base weights are bit-identical to before it was added."""
        state = self._editpeft
        adapter = _lookup(state, name)
        adapter.detach(state)
        del state.edits[name]
        return adapter

    @contextmanager
    def disabled_edits(self) -> Iterator[None]:
        """Inside the block the model behaves exactly as the unedited base model."""
        with self._editpeft.disabled():
            yield

    def set_active_edits(self, names: Iterable[str]) -> None:
        """Switch on exactly the edits in ``names`` (others stay attached but off)."""
        state = self._editpeft
        if isinstance(names, str):
            names = [names]
        elif isinstance(names, (bytes, dict)) or not isinstance(names, Iterable):
            raise EditError(f"set_active_edits takes a list of edit names, got {type(names).__name__}")
        names = list(names)
        for n in names:
            _lookup(state, n)
        for n, adapter in state.edits.items():
            adapter._active = n in names
        state.sync_merged()

    def load_edit(self, path_or_repo: str | os.PathLike, *, name: str | None = None,
                  revision: str | None = None, subfolder: str | None = None,
                  allow_mismatch: bool = False, force_download: bool = False, editor: Any = None) -> EditAdapter:
        """Load an adapter folder (or a Hub repo ``user/repo``) and attach it on top of the stack.

        ``allow_mismatch=True`` attaches an adapter made on other base weights, or by another plugin
        distribution of its method (with a warning); ``force_download=True`` fetches a Hub repo's
        files again even if the cache has them (after a download that failed its hash check).
        ``editor``: for adapters that answer through their trained editor (SERAC), that editor (a
        folder, a Hub repo id or an :class:`~editpeft.editors.Editor`) when the one the adapter
        names cannot be found here."""
        from .loading import load_adapter, resolve_adapter_dir
        state = self._editpeft
        _check_name(name)
        folder = resolve_adapter_dir(path_or_repo, revision=revision, subfolder=subfolder,
                                     force_download=force_download)
        adapter = load_adapter(folder, allow_mismatch=allow_mismatch)
        name = name or adapter.name or _fresh_name(state, adapter.method)
        if name in state.edits:
            raise EditError(f"an edit named {name!r} already exists; pass name=... to load it under another name")
        _verify_base(state, adapter, allow_mismatch)
        _verify_targets(state, adapter)
        if getattr(adapter, "uses_editor", False):
            from .editors import bind_loaded_editor
            bind_loaded_editor(adapter, self, state.tokenizer, editor)
        elif editor is not None:
            raise EditError(f"this {adapter.method} adapter does not use an editor once made; leave editor= out")
        _report_conflicts(state, name, adapter.requests)
        _attach(state, name, adapter)
        return adapter

    def edit_conflicts(self) -> list[Conflict]:
        """Pairs of active edits that rewrite the same subject and relation to different objects."""
        state = self._editpeft
        return find_conflicts([(n, a.requests) for n, a in state.edits.items() if a.active])


def _live_routers(model) -> list[EditAdapter]:
    state = model._editpeft
    return state.live_routers() if state.enabled else []


def _routed_forward(self, *args, **kwargs):
    """``forward`` through the live router edits (:mod:`editpeft.routing`); the base forward
    itself when none is live."""
    routers = _live_routers(self)
    base_forward = super(type(self), self).forward
    if not routers:
        return base_forward(*args, **kwargs)
    if args:
        params = list(inspect.signature(base_forward).parameters)
        kwargs.update(zip(params, args))
    return routed_forward(self, routers, base_forward, kwargs)


def _routed_generate(self, *args, **kwargs):
    """``generate`` with one routing decision per sequence, kept for every generated token."""
    base_generate = super(type(self), self).generate
    if not _live_routers(self):
        return base_generate(*args, **kwargs)
    return routed_generate(self, base_generate, args, kwargs)


_SAVE_DOC = """editpeft: saves the *base* model. While any edit is live this refuses (EditError) rather
than silently dropping the edits: save the adapters with ``adapter.save_pretrained``, the edited
model with ``editpeft.save_merged``, or the base model inside ``with model.disabled_edits():``.

"""


def _refuse_saving_live_edits(model) -> None:
    state = model._editpeft
    live = [n for n, a in state.edits.items() if state.is_live(a)]
    if live:
        raise EditError(f"model.save_pretrained would save the base weights without the {len(live)} live edit(s) "
                        f"({', '.join(live[:5])}{', ...' if len(live) > 5 else ''}). Save the edits with "
                        "adapter.save_pretrained(dir) (or model.edits[name].save_pretrained), the edited model "
                        "with editpeft.save_merged(model, tokenizer, dir), or the base model inside "
                        "`with model.disabled_edits(): model.save_pretrained(dir)`")


@functools.lru_cache(maxsize=None)
def _editable_class(base: type) -> type:
    """A subclass of ``base`` with the edit API; same name so saved configs are unchanged.
    ``forward`` and ``generate`` go through the router edits when any is live."""
    def forward(self, *args, **kwargs):
        return _routed_forward(self, *args, **kwargs)
    forward.__signature__ = inspect.signature(base.forward)
    forward.__doc__ = base.forward.__doc__
    attrs = {"forward": forward, "__module__": base.__module__}
    if callable(getattr(base, "generate", None)):
        def generate(self, *args, **kwargs):
            return _routed_generate(self, *args, **kwargs)
        generate.__signature__ = inspect.signature(base.generate)
        generate.__doc__ = base.generate.__doc__
        attrs["generate"] = generate
    if callable(getattr(base, "save_pretrained", None)):
        def save_pretrained(self, *args, **kwargs):
            _refuse_saving_live_edits(self)
            return base.save_pretrained(self, *args, **kwargs)
        save_pretrained.__signature__ = inspect.signature(base.save_pretrained)
        save_pretrained.__doc__ = _SAVE_DOC + (base.save_pretrained.__doc__ or "")
        attrs["save_pretrained"] = save_pretrained
    cls = type(base.__name__, (EditableMixin, base), attrs)
    cls.__qualname__ = base.__qualname__
    return cls


def enable_editing(model: nn.Module, tokenizer, *, strict_conflicts: bool | None = None) -> nn.Module:
    """Give ``model`` the edit API (``add_edit``, ``edits``, ``remove_edit``, ...) in place.

    Returns the same object. Calling it twice is harmless (the tokenizer is updated). With
    ``strict_conflicts=True`` an edit that contradicts an active one is refused instead of
    reported with a warning.
    """
    if isinstance(model, EditableMixin):
        model._editpeft.tokenizer = tokenizer
        if strict_conflicts is not None:
            model._editpeft.strict_conflicts = strict_conflicts
        return model
    get_arch(model)
    if tokenizer is None:
        raise EditError("enable_editing needs the model's tokenizer")
    model.__class__ = _editable_class(type(model))
    model._editpeft = EditState(model, tokenizer)
    model._editpeft.strict_conflicts = bool(strict_conflicts)
    return model


# -- helpers -----------------------------------------------------------------------------------
def _check_name(name: Any) -> None:
    if name is not None and (not isinstance(name, str) or not name.strip()):
        raise EditError(f"an edit name must be a non-empty string (or None for a generated one), got "
                        f"{type(name).__name__} {str(name)[:40]!r}")


def _fresh_name(state: EditState, method: str) -> str:
    i = 0
    while f"{method}-{i}" in state.edits:
        i += 1
    return f"{method}-{i}"


def _lookup(state: EditState, name: str) -> EditAdapter:
    if not isinstance(name, str):
        raise EditError(f"an edit name is a string, got {type(name).__name__} {str(name)[:40]!r}; edits on this "
                        f"model: {', '.join(state.edits) or 'none'}")
    if name not in state.edits:
        have = ", ".join(state.edits) or "none"
        raise EditError(f"no edit named {name!r}; edits on this model: {have}")
    return state.edits[name]


def _check_finite(adapter: EditAdapter, method: str) -> None:
    for key, t in adapter.state_dict().items():
        if t.is_floating_point() and not torch.isfinite(t).all():
            raise EditOptimizationError(f"method {method!r} produced non-finite values in {key!r}; "
                                        "the model was left unchanged. Try a smaller learning rate.")


def _stamp(adapter: EditAdapter, state: EditState, impl, cfg, name: str) -> None:
    info = method_info(impl.name)
    adapter.method = impl.name
    adapter.hparams = cfg.to_dict()
    adapter.plugin = {"distribution": info.distribution if info else None,
                      "version": info.version if info else None}
    adapter.base_model = base_model_record(state.model, state.fingerprint(adapter.targets))
    adapter.name = name


def _attach(state: EditState, name: str, adapter: EditAdapter) -> None:
    try:
        adapter.attach(state)
    except Exception:
        adapter.detach(state)
        raise
    adapter.name = name
    state.edits[name] = adapter


def _swap(state: EditState, name: str, old: EditAdapter, new: EditAdapter) -> None:
    new.active = old.active
    old.detach(state)
    try:
        new.attach(state)
    except Exception:
        new.detach(state)
        old.attach(state)
        state.reorder_slots()
        raise
    state.edits[name] = new
    state.reorder_slots()


def _report_conflicts(state: EditState, name: str, requests: list[EditRequest]) -> None:
    """Warn (or, with ``strict_conflicts``, refuse) when ``requests`` contradict an active edit."""
    groups = [(n, a.requests) for n, a in state.edits.items() if a.active and n != name]
    conflicts = [c for c in find_conflicts(groups + [(name, requests)]) if c.second[0] == name]
    if not conflicts:
        return
    text = "; ".join(c.describe() for c in conflicts)
    if state.strict_conflicts:
        raise EditError(f"edit {name!r} contradicts active edits: {text}. Remove or disable one of them, "
                        "or set model.edit_state.strict_conflicts = False to only warn")
    logger.warning("edit %r contradicts active edits: %s", name, text)


def _verify_base(state: EditState, adapter: EditAdapter, allow_mismatch: bool) -> None:
    # the family first; then the fingerprint, whose computation looks every target module up
    check_base_model(adapter.base_model or {}, state.model, lambda: state.fingerprint(adapter.targets),
                     what=f"adapter {adapter.name!r}", targets=adapter.targets, allow_mismatch=allow_mismatch,
                     advice="load it onto the model it was made for, or pass allow_mismatch=True to attach it anyway")

def _verify_targets(state: EditState, adapter: EditAdapter) -> None:
    """Refuse an adapter whose targets its own hparams do not imply on this model (a file whose
    hparams name another layer than the modules it writes, so its card would state the wrong one)."""
    from .errors import AdapterFormatError, ConfigError, UnsupportedModelError
    impl = get_method(adapter.method)
    try:
        expected = impl.targets(state.model, impl.Config.from_dict(adapter.hparams))
    except (ConfigError, UnsupportedModelError) as e:
        raise AdapterFormatError(f"adapter {adapter.name!r}'s hparams do not fit this model ({e})") from None
    stray = [t for t in adapter.targets if expected is not None and t not in expected]
    if stray:
        raise AdapterFormatError(f"adapter {adapter.name!r} writes {', '.join(stray)}, which its hparams do not "
                                 f"imply on this model (they give {', '.join(expected)}); the file is corrupt or "
                                 "was modified")
