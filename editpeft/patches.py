"""Patch neurons: extra key/value rows added to a feed-forward layer, applied by a hook.

A feed-forward layer is a key-value memory, ``FFN(x) = f(x Kᵀ + b) V``. A patch adds n neurons
of the same form beside it, so the layer computes

    FFN(x) + f(x K_pᵀ + b_p) ⊙ g(x) V_p,      g(x) = x G_pᵀ  (gated patches)  or  1

with K_p (n × d_in), b_p (n), V_p (n × d_out) and an optional gate G_p (n × d_in) for gated
(SwiGLU-style) layers. The patch reads the layer's input (``read`` module's input) and adds to its
output (``write`` module's output): the same module for a self-contained MLP, two modules for
families whose MLP is two loose Linear layers (OPT: read ``fc1``'s input, write ``fc2``'s output).
Nothing is merged into the base weights; removing the adapter removes the hook.
T-Patcher adds one neuron per edit; CaliNet adds calibration slots; both are this block.

Example:
    >>> p = PatchNeurons(torch.zeros(2, 4), torch.zeros(2), torch.ones(2, 3), activation="relu")
    >>> p(torch.ones(5, 4)).shape, len(p)
    (torch.Size([5, 3]), 2)
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Iterator, Mapping

import torch
from transformers.activations import ACT2FN

from .adapters import ModuleHookAdapter
from .arch import get_arch, linear_dims
from .deltas import _check_float_finite, _Follow
from .errors import AdapterFormatError, ConfigError, UnsupportedModelError

if TYPE_CHECKING:  # pragma: no cover
    from .editable import EditState

TENSOR_NAMES = ("keys", "key_bias", "values", "gate")


def activation_fn(name: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """The activation called ``name`` in transformers' table (``relu``, ``gelu``, ``silu``, ...)."""
    if name == "identity":
        return lambda x: x
    if name not in ACT2FN:
        raise ConfigError(f"unknown activation {name!r}; use 'identity' or one of {sorted(ACT2FN)}")
    return ACT2FN[name]


class PatchNeurons:
    """n patch neurons of a feed-forward layer (see the module docstring for the formula)."""

    def __init__(self, keys: torch.Tensor, key_bias: torch.Tensor, values: torch.Tensor,
                 gate: torch.Tensor | None = None, activation: str = "relu"):
        n = keys.shape[0]
        if keys.ndim != 2 or values.ndim != 2 or key_bias.shape != (n,) or values.shape[0] != n:
            raise ValueError(f"patch tensors must be keys (n, d_in), key_bias (n,), values (n, d_out); got "
                             f"{tuple(keys.shape)}, {tuple(key_bias.shape)}, {tuple(values.shape)}")
        if gate is not None and gate.shape != keys.shape:
            raise ValueError(f"the gate must have the keys' shape {tuple(keys.shape)}; got {tuple(gate.shape)}")
        _check_float_finite("patch", *[t for t in (keys, key_bias, values, gate) if t is not None])
        self.keys, self.key_bias, self.values, self.gate = keys, key_bias, values, gate
        self.activation = activation
        self._act = activation_fn(activation)
        self._follow = _Follow()

    @classmethod
    def empty(cls, d_in: int, d_out: int, *, gated: bool = False, activation: str = "relu") -> "PatchNeurons":
        return cls(torch.zeros(0, d_in), torch.zeros(0), torch.zeros(0, d_out),
                   torch.zeros(0, d_in) if gated else None, activation)

    def __len__(self) -> int:
        return self.keys.shape[0]

    @property
    def dims(self) -> tuple[int, int]:
        """(d_in, d_out)."""
        return self.keys.shape[1], self.values.shape[1]

    def with_tensors(self, **tensors: torch.Tensor | None) -> "PatchNeurons":
        """A copy with some tensors replaced (e.g. trainable ones during optimisation)."""
        now = {k: getattr(self, k) for k in TENSOR_NAMES}
        return PatchNeurons(**{**now, **tensors}, activation=self.activation)

    def append(self, other: "PatchNeurons") -> "PatchNeurons":
        """These neurons followed by ``other``'s (same dims and activation)."""
        if other.dims != self.dims or (other.gate is None) != (self.gate is None):
            raise ValueError("cannot join patches of different shapes")
        cat = lambda a, b: None if a is None else torch.cat([a, b.to(a)])  # noqa: E731
        return PatchNeurons(*(cat(getattr(self, k), getattr(other, k)) for k in TENSOR_NAMES),
                            activation=self.activation)

    def activations(self, x: torch.Tensor) -> torch.Tensor:
        """Per-neuron activations ``f(x K_pᵀ + b_p) ⊙ g(x)``, shape (..., n)."""
        tensors = tuple(t for t in (self.keys, self.key_bias, self.gate) if t is not None)
        cast = self._follow.get(tensors, x) if not torch.is_grad_enabled() else tuple(t.to(x) for t in tensors)
        keys, bias = cast[0], cast[1]
        a = self._act(x @ keys.T + bias)
        if self.gate is not None:
            a = a * (x @ cast[2].T)
        return a

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.activations(x) @ self.values.to(x)

    def tensors(self) -> dict[str, torch.Tensor]:
        return {k: getattr(self, k).detach().contiguous() for k in TENSOR_NAMES if getattr(self, k) is not None}


@dataclass(frozen=True)
class PatchSite:
    """Where a patch reads its input (``read`` module's input) and adds its output (``write``'s output)."""

    read: str
    write: str

    @classmethod
    def ffn(cls, model, layer: int, stack: str | None = None) -> "PatchSite":
        """The feed-forward layer of block ``layer`` (of ``stack`` in encoder–decoder models)."""
        arch = get_arch(model)
        return cls(arch.site(layer, "mlp_in", stack).module, arch.site(layer, "mlp_out", stack).module)


class PatchNeuronAdapter(ModuleHookAdapter):
    """Patch neurons at one or more feed-forward layers (keyed by their ``write`` module).

    Saved tensors: ``<write>.keys``, ``<write>.key_bias``, ``<write>.values`` (and ``<write>.gate``);
    ``extra_config`` records each patch's read module and activation.
    """

    def __init__(self, patches: Mapping[PatchSite, PatchNeurons], **common: Any):
        common.pop("targets", None)
        self.patches: dict[PatchSite, PatchNeurons] = dict(patches)
        targets = list(dict.fromkeys(m for s in self.patches for m in (s.read, s.write)))
        super().__init__(targets=targets, **common)
        self._stash: dict[str, torch.Tensor] = {}

    def __len__(self) -> int:
        return sum(len(p) for p in self.patches.values())

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {f"{s.write}.{k}": t for s, p in self.patches.items() for k, t in p.tensors().items()}

    def extra_config(self) -> dict[str, Any]:
        return {"patches": [{"read": s.read, "write": s.write, "activation": p.activation}
                            for s, p in self.patches.items()]}

    @classmethod
    def from_saved(cls, tensors, extra, **common) -> "PatchNeuronAdapter":
        entries = extra.get("patches")
        if not isinstance(entries, list) or not entries:
            raise AdapterFormatError("a patch-neuron adapter config needs extra.patches (read/write/activation)")
        patches = {}
        for e in entries:
            try:
                site = PatchSite(str(e["read"]), str(e["write"]))
                parts = {k: tensors.get(f"{site.write}.{k}") for k in TENSOR_NAMES}
                patches[site] = PatchNeurons(parts["keys"], parts["key_bias"], parts["values"], parts["gate"],
                                             activation=str(e["activation"]))
            except (KeyError, TypeError, AttributeError) as err:
                raise AdapterFormatError(f"bad patch entry {e!r}: {err}") from None
            except (ValueError, ConfigError) as err:
                raise AdapterFormatError(f"bad patch tensors for {e.get('write')!r}: {err}") from None
        return cls(patches, **common)

    def prepare(self, state: "EditState") -> None:
        for site, patch in self.patches.items():
            d_in, d_out = _input_width(state.module(site.read)), _output_width(state.module(site.write))
            if (d_in is not None and d_in != patch.dims[0]) or (d_out is not None and d_out != patch.dims[1]):
                raise AdapterFormatError(f"the patch at {site.write!r} is {patch.dims[0]}->{patch.dims[1]} but the "
                                         f"model's layer is {d_in}->{d_out}: this adapter was made for another model")

    def hooks(self) -> list[tuple[str, str, Callable]]:
        out: list[tuple[str, str, Callable]] = []
        for site, patch in self.patches.items():
            if site.read == site.write:
                out.append((site.write, "output", lambda args, y, p=patch: y + p(args[0]).to(y.dtype)))
                continue
            out.append((site.read, "input", lambda args, w=site.write: self._stash.__setitem__(w, args[0])))
            out.append((site.write, "output", lambda args, y, w=site.write, p=patch: y + p(self._stash.pop(w)).to(y.dtype)))
        return out


@contextmanager
def temporary_patch(model, site: PatchSite, patch: PatchNeurons) -> Iterator[None]:
    """Apply ``patch`` at ``site`` for the duration of the block (while an edit is computed; the
    patch's tensors may require grad)."""
    read, write = model.get_submodule(site.read), model.get_submodule(site.write)
    seen: list[torch.Tensor] = []
    handles = []
    if site.read != site.write:
        handles.append(read.register_forward_pre_hook(lambda m, args: seen.append(args[0])))
        handles.append(write.register_forward_hook(lambda m, args, y: y + patch(seen.pop()).to(y.dtype)))
    else:
        handles.append(write.register_forward_hook(lambda m, args, y: y + patch(args[0]).to(y.dtype)))
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def _input_width(module) -> int | None:
    """Width of ``module``'s input: its own for a Linear/Conv1D, else its first projection's."""
    projections = [m for m in module.modules() if _is_projection(m)]
    return linear_dims(projections[0])[0] if projections else None


def _output_width(module) -> int | None:
    """Width of ``module``'s output: its own for a Linear/Conv1D, else its last projection's."""
    projections = [m for m in module.modules() if _is_projection(m)]
    return linear_dims(projections[-1])[1] if projections else None


def _is_projection(module) -> bool:
    try:
        linear_dims(module)
        return True
    except UnsupportedModelError:
        return False
