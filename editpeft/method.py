"""The plugin contract: a config dataclass and a method that computes an adapter.

Example (a complete plugin, see docs/writing-a-plugin.md):
    >>> from dataclasses import dataclass, field
    >>> import editpeft
    >>> @dataclass
    ... class MyConfig(editpeft.MethodConfig):
    ...     layer: int = field(default=5, metadata={"help": "decoder block to edit"})
    >>> class MyMethod(editpeft.EditMethod):
    ...     name, kind, Config = "mine", "weight_delta", MyConfig
    ...     def compute(self, model, tokenizer, requests, config): ...
"""
from __future__ import annotations

import collections.abc
import dataclasses
import functools
from contextlib import contextmanager
import inspect
from abc import ABC, abstractmethod
import logging
import math
import os
import types
import typing
from dataclasses import dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Iterator, Mapping, Sequence

from .adapters import ADAPTER_KINDS, EditAdapter
from .errors import ConfigError, EditError, EditorRequiredError, InvalidRequestError, UnsupportedModelError
from .request import EditRequest

if TYPE_CHECKING:  # pragma: no cover
    import torch

logger = logging.getLogger(__name__)


@dataclass
class MethodConfig:
    """Base of every method's hyper-parameters. Fields carry ``metadata={"help": ...}``;
    subclasses validate in :meth:`validate` (called from ``__post_init__``)."""

    #: names of fields that index a decoder block (rescaled when a card targets another depth)
    layer_fields: ClassVar[tuple[str, ...]] = ()

    def __post_init__(self) -> None:
        hints = _field_types(type(self))
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name in hints and not _matches(value, hints[f.name]):
                raise ConfigError(f"{type(self).__name__}.{f.name} must be {_describe(hints[f.name])}, got "
                                  f"{type(value).__name__} {str(value)[:40]!r}")
            if isinstance(value, float) and not math.isfinite(value):
                raise ConfigError(f"{type(self).__name__}.{f.name} must be finite, got {value}")
        self.validate()

    def validate(self) -> None:
        """Raise :class:`ConfigError` for invalid values."""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "MethodConfig":
        names = {f.name for f in fields(cls)}
        unknown = set(data) - names
        if unknown:
            raise ConfigError(f"unknown {cls.__name__} field(s) {sorted(unknown)}; valid fields: {sorted(names)}")
        try:
            return cls(**dict(data))
        except TypeError as e:
            raise ConfigError(f"invalid {cls.__name__}: {e}") from None

    def replace(self, **changes: Any) -> "MethodConfig":
        return self.from_dict({**self.to_dict(), **changes})

    @classmethod
    def help(cls) -> dict[str, str]:
        """Field name -> help text."""
        return {f.name: f.metadata.get("help", "") for f in fields(cls)}


@functools.lru_cache(maxsize=None)
def _field_types(cls: type) -> dict[str, Any]:
    """The resolved field annotations of a config class ({} when they cannot be resolved)."""
    try:
        return typing.get_type_hints(cls)
    except Exception:   # an annotation naming something the module does not import at run time
        logger.debug("cannot resolve the field types of %s; their values are not type-checked", cls.__name__)
        return {}


def _matches(value: Any, hint: Any) -> bool:
    """Whether ``value`` (as read from JSON/YAML) fits the annotation ``hint``: int for float is
    fine, bool for int or float is not, a list stands for a tuple; unknown hints accept anything."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any or isinstance(hint, typing.TypeVar):
        return True
    if origin in (typing.Union, types.UnionType):
        return any(_matches(value, a) for a in args)
    if hint is type(None):
        return value is None
    if origin is typing.Literal:
        return value in args
    if hint in (int, float):
        allowed = (int,) if hint is int else (int, float)
        return isinstance(value, allowed) and not isinstance(value, bool)
    if hint in (bool, str):
        return isinstance(value, hint)
    base = origin or hint
    if base in (list, tuple, Sequence, collections.abc.Sequence):
        if not isinstance(value, (list, tuple)):
            return False
        item = args[0] if args and (base is not tuple or len(args) == 2 and args[1] is Ellipsis) else None
        return item is None or all(_matches(v, item) for v in value)
    if base in (dict, Mapping, collections.abc.Mapping):
        return isinstance(value, dict)
    return True


def _describe(hint: Any) -> str:
    return str(hint).replace("typing.", "").replace("NoneType", "None").replace("<class '", "").replace("'>", "")


def check(cond: bool, message: str) -> None:
    """Raise :class:`ConfigError` with ``message`` unless ``cond`` holds."""
    if not cond:
        raise ConfigError(message)


class EditMethod(ABC):
    """An editing method: subclasses set ``name``, ``kind`` and ``Config`` and implement
    :meth:`compute`. Methods that can add requests to an existing adapter (lifelong memories)
    implement :meth:`extend`. The default adapter class per kind is used for loading unless
    ``adapter_class`` names another."""

    name: ClassVar[str] = ""
    kind: ClassVar[str] = ""
    Config: ClassVar[type[MethodConfig]] = MethodConfig
    adapter_class: ClassVar[type[EditAdapter] | None] = None
    #: model topologies the method can edit (see ``editpeft.arch``): "causal" (decoder-only)
    #: and/or "seq2seq" (encoder-decoder, e.g. T5), e.g. ``topologies = ("causal", "seq2seq")``
    topologies: ClassVar[tuple[str, ...]] = ("causal",)

    # -- capabilities: checked once by add_edit before any work ---------------------------------
    #: every request must name its subject (locate-then-edit methods)
    needs_subject: ClassVar[bool] = False
    #: a list of several requests can be edited in one call
    supports_batch: ClassVar[bool] = True

    @abstractmethod
    def compute(self, model, tokenizer, requests: Sequence[EditRequest], config: MethodConfig) -> EditAdapter:
        """Compute the edit of ``requests`` on ``model`` (parameters frozen, eval mode) and return
        an unattached adapter. Must not change the model; raise an EditError subclass on failure."""

    def extend(self, adapter: EditAdapter, model, tokenizer, requests: Sequence[EditRequest],
               config: MethodConfig) -> EditAdapter:
        """Return a *new* adapter holding ``adapter``'s edits plus ``requests`` (never mutate
        ``adapter``: a failure must leave the attached one as it was)."""
        raise EditError(f"method {self.name!r} cannot append to an existing adapter; "
                        "add the edit under a new name instead")

    @classmethod
    def supports_extend(cls) -> bool:
        return cls.extend is not EditMethod.extend

    def targets(self, model, config: MethodConfig) -> list[str] | None:
        """The modules an adapter computed with ``config`` on ``model`` may write to, or None when
        the method cannot say before computing. Loading checks a saved adapter's targets against
        its hparams with this (a file whose hparams name another layer is refused)."""
        return None

    # -- trained editors (MEND, KE, SERAC; see editpeft.editors) -------------------------------
    #: True when ``compute`` needs a trained editor; the core then passes ``editor=`` to
    #: ``compute``/``extend`` (only to such methods) and refuses ``add_edit`` without one.
    requires_editor: ClassVar[bool] = False
    #: the :class:`editpeft.editors.Editor` subclass that rebuilds saved editors (None: Editor)
    editor_class: ClassVar[type | None] = None

    def init_editor(self, model, tokenizer, config: MethodConfig):
        """A fresh, untrained :class:`~editpeft.editors.Editor` for ``model`` (its tensors define
        the shapes a saved editor must have on this model)."""
        raise EditError(f"method {self.name!r} does not learn an editor from data")

    def editor_step(self, editor, model, tokenizer, batch: Sequence[EditRequest],
                    config: MethodConfig) -> Mapping[str, Any]:
        """The training losses of one batch: a dict with a scalar ``"loss"`` tensor that depends on
        the editor's tensors (the core backpropagates it and steps the optimiser), plus any
        other values to log."""
        raise EditError(f"method {self.name!r} does not learn an editor from data")

    def editor_lr_scales(self, config: MethodConfig) -> Mapping[str, float]:
        """Learning-rate multipliers for editor tensors, by name prefix (the longest matching prefix
        wins; default none: every tensor trains at the run's ``lr``). E.g. a pre-trained encoder
        fine-tuned beside freshly initialised heads: ``{"encoder.": 1e-3}``."""
        return {}

    def editor_eval(self, editor, model, tokenizer, batch: Sequence[EditRequest],
                    config: MethodConfig) -> dict[str, float]:
        """Validation metrics of one batch (default: the values of :meth:`editor_step`, no update)."""
        return {k: float(v.detach() if hasattr(v, "detach") else v)
                for k, v in self.editor_step(editor, model, tokenizer, batch, config).items()}

    def build_editor(self, model, tokenizer, cases: Sequence[Any], config: MethodConfig):
        """Build the editor in one pass from training ``cases`` (evaluation cases: requests,
        paraphrases, locality probes with answers), for methods that learn nothing by optimisation
        (IKE's demonstration pool); ``train_editor`` then skips the optimisation loop."""
        raise EditError(f"method {self.name!r} does not build an editor from data")

    @classmethod
    def builds_editor(cls) -> bool:
        """True when the editor is built in one pass (:meth:`build_editor`), not trained."""
        return cls.build_editor is not EditMethod.build_editor

    @classmethod
    def trains_editor(cls) -> bool:
        """True when the method can train (or build) its editor (``editpeft train``)."""
        return cls.init_editor is not EditMethod.init_editor and (
            cls.editor_step is not EditMethod.editor_step or cls.builds_editor())

    @classmethod
    def check_capabilities(cls, model, requests: Sequence[EditRequest], *, appending: bool,
                           has_editor: bool = False) -> None:
        """Refuse, before any work, what this method cannot do (raises an :class:`EditError`)."""
        topology = model_topology(model)
        if topology not in cls.topologies:
            raise UnsupportedModelError(f"method {cls.name!r} supports {' and '.join(cls.topologies)} models; this "
                                        f"{model.config.model_type!r} model is {topology}. Use a method that "
                                        f"supports {topology} models (editpeft.list_methods())")
        if cls.requires_editor and not has_editor:
            raise EditorRequiredError(
                f"method {cls.name!r} edits with a trained editor and none was given. Train one with "
                f"editpeft.train_editor({cls.name!r}, model, tokenizer, 'train.json', out='editors/{cls.name}') "
                f"or `editpeft train {cls.name} --data train.json --out editors/{cls.name}`, then pass "
                "editor=<that folder, a Hub repo id 'user/repo', or the Editor>")
        if has_editor and not cls.trains_editor():
            raise EditError(f"method {cls.name!r} does not use a trained editor; leave editor= out")
        if appending and not cls.supports_extend():
            raise EditError(f"method {cls.name!r} cannot append to an existing adapter; "
                            "add the edit under a new name instead")
        if len(requests) > 1 and not cls.supports_batch:
            raise InvalidRequestError(f"method {cls.name!r} edits one fact per call; got {len(requests)}. "
                                      "Add one edit per fact (or append=True where supported)")
        if cls.needs_subject:
            for r in requests:
                if r.subject is None:
                    raise InvalidRequestError(f"method {cls.name!r} needs the subject of each fact; "
                                              f"request {r.prompt!r} has none: pass subject=...")

    @classmethod
    def loader_class(cls) -> type[EditAdapter]:
        """The adapter class that rebuilds saved adapters of this method."""
        loader = cls.adapter_class or ADAPTER_KINDS[cls.kind]
        if inspect.isabstract(loader):
            raise EditError(f"method {cls.name!r} must set adapter_class to its concrete {cls.kind} adapter "
                            "class so that saved adapters can be loaded")
        return loader

    # -- configuration ------------------------------------------------------------------------
    def resolve_config(self, model, config: "MethodConfig | Mapping[str, Any] | str | os.PathLike | None") -> MethodConfig:
        """Turn ``config`` (None, a dict of overrides, a card path, or a Config) into a Config.

        None and dicts start from the card ``cards/<method>/<model_type>.yaml`` when one exists;
        a card tuned on a model of another depth has its layer fields rescaled proportionally.
        """
        if isinstance(config, self.Config):
            return config
        if isinstance(config, MethodConfig):
            raise ConfigError(f"{type(config).__name__} is not the config of method {self.name!r}; "
                              f"use {self.Config.__name__}")
        if isinstance(config, (str, os.PathLike)):
            from .cards import read_card
            return self.Config.from_dict(read_card(Path(config)).get("hparams", {}))
        if config is not None and not isinstance(config, Mapping):
            raise ConfigError(f"config must be a dict, a card path or {self.Config.__name__}, "
                              f"got {type(config).__name__}")
        from .cards import card_hparams
        base = card_hparams(self.name, model, self.Config.layer_fields)
        return self.Config.from_dict({**base, **dict(config or {})})


def model_topology(model) -> str:
    """``"seq2seq"`` for encoder–decoder models, ``"causal"`` otherwise."""
    return "seq2seq" if getattr(getattr(model, "config", None), "is_encoder_decoder", False) else "causal"


@contextmanager
def computing(model: "torch.nn.Module") -> Iterator[None]:
    """Freeze parameters and switch to eval mode while a method computes (the state ``compute``
    is called in); restore both afterwards."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    training = model.training
    model.eval()
    for p, _ in flags:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)
        model.train(training)
