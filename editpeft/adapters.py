"""Adapter base classes: what an edit *is* once computed, one class per attachment kind.

An adapter knows its tensors and how to attach them; it does not know how it was computed.
Plugins return one of these from :meth:`EditMethod.compute` (often the core class itself, as
ROME returns a plain :class:`WeightDeltaAdapter`).

Example:
    >>> adapter = model.add_edit("rome", request, name="eiffel")   # doctest: +SKIP
    >>> adapter.merge(); adapter.unmerge()                         # doctest: +SKIP
    >>> adapter.save_pretrained("edits/eiffel")                    # doctest: +SKIP
"""
from __future__ import annotations

import contextlib
import os
from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, Any, Callable, ClassVar, Iterator, Mapping, Sequence

import torch

from .arch import linear_dims
from .deltas import DELTA_TYPES, WeightChange
from .errors import AdapterFormatError, EditError
from .request import EditRequest

if TYPE_CHECKING:  # pragma: no cover
    from .editable import EditState
    from .routing import Prompts, Route



class EditAdapter(ABC):
    """Base of every adapter. Subclasses set ``kind`` and implement the tensor (de)serialisation
    (:meth:`state_dict` / :meth:`from_saved`) and :meth:`attach` / :meth:`detach`."""

    kind: ClassVar[str] = ""

    def __init__(self, *, method: str, hparams: Mapping[str, Any], requests: list[EditRequest],
                 targets: list[str]):
        self.method = method
        self.hparams = dict(hparams)
        self.requests = list(requests)
        self.targets = list(targets)
        self._state: "EditState | None" = None
        self.name: str | None = None
        self._active = True
        self.merged = False
        self.base_model: dict[str, Any] = {}
        self.plugin: dict[str, Any] = {}
        self.metrics: dict[str, Any] = {}
        self.editor: dict[str, Any] = {}   # {'id', 'sha256'} of the trained editor that made it

    @property
    def active(self) -> bool:
        """The adapter's switch: off, it contributes nothing (merged or not) until switched on."""
        return self._active

    @active.setter
    def active(self, value: bool) -> None:
        self._active = bool(value)
        if self._state is not None:
            self._state.sync_merged()

    @contextlib.contextmanager
    def switched_off(self) -> Iterator[None]:
        """Switch the adapter off inside the block and restore its switch after — how an append
        trains the successor of an attached adapter without counting the attached one twice.

        >>> with adapter.switched_off():                                  # doctest: +SKIP
        ...     successor = train_from(adapter)
        """
        was_active, self.active = self.active, False
        try:
            yield
        finally:
            self.active = was_active

    # -- serialisation (implemented by kinds / plugins) ---------------------------------------
    @abstractmethod
    def state_dict(self) -> dict[str, torch.Tensor]:
        """The adapter's tensors (saved to ``edit_model.safetensors``)."""

    def extra_config(self) -> dict[str, Any]:
        """JSON-serialisable state that is not a tensor (saved in ``edit_config.json``)."""
        return {}

    @classmethod
    @abstractmethod
    def from_saved(cls, tensors: dict[str, torch.Tensor], extra: dict[str, Any], **common: Any) -> "EditAdapter":
        """Rebuild an adapter from its saved tensors, ``extra_config()`` and the common fields."""

    # -- attachment ---------------------------------------------------------------------------
    @abstractmethod
    def attach(self, state: "EditState") -> None:
        """Register the adapter's contributions on ``state``'s modules (or as a router)."""

    def detach(self, state: "EditState") -> None:
        for target in self.targets:
            slot = state.slots.get(target)
            if slot is not None:
                slot.remove(self)
                state.drop_slot_if_empty(target)

    @property
    def attached(self) -> bool:
        return self._state is not None

    # -- merging (weight deltas only) ---------------------------------------------------------
    def merge(self) -> None:
        raise EditError(f"a {self.kind} adapter ({self.method}) cannot be merged into the weights; "
                        "only weight-delta adapters can")

    def unmerge(self) -> None:
        if self.merged:
            raise EditError("this adapter cannot be unmerged")

    # -- sharing ------------------------------------------------------------------------------
    def save_pretrained(self, path: str | os.PathLike, *, readme: bool = True, overwrite: bool = False) -> str:
        """Write the adapter folder (``edit_config.json``, ``edit_model.safetensors``, README).

        Into a new, empty or adapter folder; a folder with other files is refused unless
        ``overwrite=True`` (they are then kept). See :func:`editpeft.io.save_adapter`."""
        from .io import save_adapter
        return save_adapter(self, path, readme=readme, overwrite=overwrite)

    def push_to_hub(self, repo_id: str, *, subfolder: str | None = None, private: bool | None = None,
                    commit_message: str | None = None, token: str | None = None) -> str:
        """Upload the adapter folder to a Hub model repo (``subfolder`` of it); returns the commit URL."""
        from .hub import push_adapter
        return push_adapter(self, repo_id, subfolder=subfolder, private=private, commit_message=commit_message,
                            token=token)

    def num_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.state_dict().values())

    def __repr__(self) -> str:
        facts = ", ".join(f"{r.subject or r.prompt!r}->{r.target_new!r}" for r in self.requests[:3])
        more = f", +{len(self.requests) - 3}" if len(self.requests) > 3 else ""
        flags = "" if self.active else " inactive"
        flags += " merged" if self.merged else ""
        return f"<{type(self).__name__} {self.name!r} method={self.method} [{facts}{more}]{flags}>"


class WeightDeltaAdapter(EditAdapter):
    """Weight changes of Linear/Conv1D modules (:class:`LowRankDelta` or :class:`DenseDelta`),
    applied by a forward hook; :meth:`merge` bakes them into the weights.

    Saved tensors: ``<module>.up`` / ``<module>.down`` for a low-rank delta, ``<module>.weight``
    for a dense one (out × in), in the dtype they were computed in.
    """

    kind = "weight_delta"

    def __init__(self, deltas: Mapping[str, WeightChange], **common: Any):
        common.pop("targets", None)
        super().__init__(targets=list(deltas), **common)
        self.deltas: dict[str, WeightChange] = dict(deltas)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {f"{target}.{k}": t for target, d in self.deltas.items() for k, t in d.tensors().items()}

    @classmethod
    def from_saved(cls, tensors: dict[str, torch.Tensor], extra: dict[str, Any], **common: Any) -> "WeightDeltaAdapter":
        targets = common.pop("targets")
        deltas = {}
        for t in targets:
            kind = "low_rank" if f"{t}.up" in tensors or f"{t}.down" in tensors else (
                "dense" if f"{t}.weight" in tensors else None)
            if kind is None:
                raise AdapterFormatError(f"the adapter file has no tensors for {t!r} (expected "
                                         f"{t}.up/{t}.down or {t}.weight)")
            delta_cls = DELTA_TYPES[kind]
            try:
                deltas[t] = delta_cls.from_tensors({s: tensors[f"{t}.{s}"] for s in delta_cls.suffixes})
            except KeyError as e:
                raise AdapterFormatError(f"tensor {e.args[0]!r} is missing from the adapter file") from None
            except ValueError as e:
                raise AdapterFormatError(f"bad {kind} delta for {t!r}: {e}") from None
        return cls(deltas, **common)

    def attach(self, state: "EditState") -> None:
        for target, delta in self.deltas.items():
            d_in, d_out = linear_dims(state.module(target))
            if delta.shape() != (d_out, d_in):
                out_, in_ = delta.shape()
                raise AdapterFormatError(
                    f"the delta for {target!r} is {out_}x{in_} but the module is {d_out}x{d_in}: "
                    "this adapter was made for another model")
        for target, delta in self.deltas.items():
            state.slot(target).add(self, _add_delta(delta))
        self._state = state

    def detach(self, state: "EditState") -> None:
        if self.merged:
            self.unmerge()
        super().detach(state)
        self._state = None

    def to_peft_lora(self, path: str | os.PathLike, **options: Any) -> str:
        """Write this edit as a standard PEFT LoRA adapter folder (see :mod:`editpeft.lora_export`)."""
        from .lora_export import export_peft_lora
        return str(export_peft_lora([self], path, **options))

    def merge(self) -> None:
        """Bake the deltas into the module weights (the hook is then skipped)."""
        state = self._require_state()
        if self.merged:
            return
        for target, delta in self.deltas.items():
            state.slot(target).merge(self, delta)
        self.merged = True

    def unmerge(self) -> None:
        """Restore the weights as they were before :meth:`merge` (bitwise)."""
        state = self._require_state()
        if not self.merged:
            return
        for target in self.deltas:
            state.slot(target).unmerge(self)
        self.merged = False

    def _require_state(self) -> "EditState":
        if self._state is None:
            raise EditError("attach the adapter to a model first (model.load_edit / add_edit)")
        return self._state


class CarriedStateDeltaAdapter(WeightDeltaAdapter):
    """Weight deltas plus a per-module state the method needs to *continue* (``append=True``) after
    save → load → Hub download: AlphaEdit's keys of earlier edits, UltraEdit's running statistics.

    Subclasses name the state (``carried_what``, for messages) and convert it to and from tensors
    saved beside the deltas: :meth:`carried_tensors` and :meth:`read_carried` (which raises
    :class:`AdapterFormatError` on anything malformed). ``self.carried`` maps each target to it.

    Example:
        >>> class Counted(CarriedStateDeltaAdapter):
        ...     carried_what = "counts"
        ...     @classmethod
        ...     def carried_tensors(cls, target, value): return {f"{target}.count": value}
        ...     @classmethod
        ...     def read_carried(cls, target, delta, tensors): return tensors[f"{target}.count"]
    """

    carried_what: ClassVar[str] = "carried state"

    def __init__(self, deltas: Mapping[str, WeightChange], carried: Mapping[str, Any], **common: Any):
        super().__init__(deltas, **common)
        missing = set(self.deltas) - set(carried)
        if missing:
            raise AdapterFormatError(f"the adapter has no {self.carried_what} for {sorted(missing)}")
        self.carried = {t: carried[t] for t in self.deltas}

    @classmethod
    @abstractmethod
    def carried_tensors(cls, target: str, value: Any) -> dict[str, torch.Tensor]:
        """The tensors that save ``value``, the state of ``target``."""

    @classmethod
    @abstractmethod
    def read_carried(cls, target: str, delta: WeightChange, tensors: Mapping[str, torch.Tensor]) -> Any:
        """The state of ``target`` from the saved ``tensors``, validated against its ``delta``."""

    def state_dict(self) -> dict[str, torch.Tensor]:
        out = super().state_dict()
        for target, value in self.carried.items():
            out.update(self.carried_tensors(target, value))
        return out

    @classmethod
    def from_saved(cls, tensors: dict[str, torch.Tensor], extra: dict[str, Any], **common: Any):
        plain = WeightDeltaAdapter.from_saved(tensors, extra, **common)
        carried = {t: cls.read_carried(t, d, tensors) for t, d in plain.deltas.items()}
        common.pop("targets", None)
        return cls(plain.deltas, carried, **common)


def _add_delta(delta: WeightChange) -> Callable:
    def contribution(args: tuple, output: torch.Tensor) -> torch.Tensor:
        return output + delta(args[0])
    return contribution


class ModuleHookAdapter(EditAdapter):
    """Changes the input or output of modules (codebooks, patch neurons, side modules).

    Simple adapters implement :meth:`transform` (the new output of each target module); adapters
    that read one module's input and write another's output override :meth:`hooks`. Attachment,
    ordering and toggling come from the core.
    """

    kind = "module_hook"

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if cls.hooks is ModuleHookAdapter.hooks and not hasattr(cls, "transform"):
            raise TypeError(f"{cls.__name__} must define transform(target, inputs, output) or override hooks()")

    # Subclasses define ``transform(target, inputs, output) -> new output`` (one output hook per
    # target, see :meth:`hooks`) or override :meth:`hooks` for input sites or several modules.

    def hooks(self) -> list[tuple[str, str, Callable]]:
        """``(module name, "input" | "output", contribution)`` triples to register, in order.
        An output contribution maps ``(args, output)`` to the new output; an input contribution
        maps ``args`` to the new first input (or None to keep it)."""
        return [(target, "output", _transform(self, target)) for target in self.targets]

    def prepare(self, state: "EditState") -> None:
        """Validate shapes against the model before attaching (raise AdapterFormatError)."""

    def attach(self, state: "EditState") -> None:
        self.prepare(state)
        hooks = self.hooks()
        for target, _, _ in hooks:
            state.module(target)
        for target, where, fn in hooks:
            state.slot(target).add(self, fn, where)
        self._state = state

    def detach(self, state: "EditState") -> None:
        super().detach(state)
        self._state = None


def _transform(adapter: ModuleHookAdapter, target: str) -> Callable:
    def contribution(args: tuple, output: torch.Tensor) -> torch.Tensor:
        return adapter.transform(target, args[0], output)
    return contribution


class RouterAdapter(EditAdapter):
    """Governs the whole model's ``forward`` and ``generate`` (counterfactual models, in-context
    editing, logit rules); the machinery lives in :mod:`editpeft.routing`.

    Override any of:

    - ``decide(model, prompts)``: once per sequence, from the caller's prompt, one
      :class:`~editpeft.routing.Route` per in-scope row (prefix token ids to prepend, a side
      model to serve the row, an ``entry`` of your own) or ``None`` per out-of-scope row. The
      decision is kept for every generated token of that sequence.
    - ``route(model, inputs, call_next)``: wraps every forward (first router outermost); get
      this router's decisions and the sequence's tokens so far with
      ``editpeft.routing.current_session(model)``.
    - ``side_modules()``: named modules (scope classifier, counterfactual model) saved in the
      adapter's safetensors as ``side.<name>.*`` (include ``super().state_dict()`` in yours) and
      moved to the base model's device and dtype when routing.

    Example:
        >>> class Prepend(RouterAdapter):                                         # doctest: +SKIP
        ...     def decide(self, model, prompts):
        ...         return [Route(prefix=self.ids) if self.trigger in prompts.texts()[i] else None
        ...                 for i in range(len(prompts))]
    """

    kind = "router"

    def decide(self, model, prompts: "Prompts") -> Sequence["Route | None"]:
        """One :class:`Route` (in scope) or ``None`` per row of ``prompts``; default: none in scope."""
        return [None] * len(prompts)

    def route(self, model, inputs: dict[str, Any], call_next: Callable[[dict[str, Any]], Any]) -> Any:
        """Return the model output for ``inputs``; ``call_next(inputs)`` runs the rest of the stack."""
        return call_next(inputs)
    route.passthrough = True      # routers that keep this default are skipped in the forward chain

    def side_modules(self) -> dict[str, torch.nn.Module]:
        """Named side modules (names without '.'); not submodules of the base model."""
        return {}

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The side modules' tensors (``side.<name>.<param>``); subclasses add their own."""
        from .routing import side_state_dict
        return side_state_dict(self.side_modules())

    def attach(self, state: "EditState") -> None:
        self._state = state

    def detach(self, state: "EditState") -> None:
        self._state = None


#: The one place that declares the adapter kinds and the base class of each:
#: weight_delta — changes of Linear/Conv1D weights, hooked or merged (ROME, MEMIT, FT, LoRA, MEND);
#: module_hook — a transformation at named module sites (codebooks, patch neurons, side memories);
#: router — a model-level wrapper around forward and generate (counterfactual models, in-context).
ADAPTER_KINDS: dict[str, type[EditAdapter]] = {
    "weight_delta": WeightDeltaAdapter, "module_hook": ModuleHookAdapter, "router": RouterAdapter}
KINDS: tuple[str, ...] = tuple(ADAPTER_KINDS)
