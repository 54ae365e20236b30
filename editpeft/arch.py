"""Where things live in each supported model family: its stacks of blocks and named sites.

The family is chosen by ``config.model_type`` (never by a substring of the model's name). A
family is a *layout*: its topology (``"causal"`` or ``"seq2seq"``) and its stacks of blocks
(causal families have one stack, ``"decoder"``; T5-like models have ``"encoder"`` and
``"decoder"``). In every block of every stack, :meth:`Arch.site` resolves a named place in the
forward pass to a ``(module_name, "input" | "output")`` pair:

=================  ==============================================================================
``mlp_in``         input of the MLP (after the block's pre-MLP norm), hidden width
``mlp_act``        the FFN's inner activation, i.e. the input of its output projection: the "keys"
                   of the FFN memory, inner width
``mlp_out_proj``   output of the MLP's output projection module (where weight deltas attach)
``mlp_out``        output of the MLP as a whole, before its residual addition (same module as
                   ``mlp_out_proj`` when the MLP is loose layers, as in OPT)
``block_out``      output of the block (the residual stream after it); some blocks (T5, GPT-2
                   with caching) return a tuple whose first element is the hidden states
=================  ==============================================================================

An ``"input"`` site is the first positional argument of the module's forward; an ``"output"``
site is its return value. OPT flattens tokens inside its MLP: its MLP sites carry
``(batch * seq, width)`` tensors (see :func:`editpeft.attach.as_btd`).

Example:
    >>> arch = get_arch(model)                      # doctest: +SKIP
    >>> arch.mlp_out_name(7)                        # doctest: +SKIP
    'model.layers.7.mlp.down_proj'
    >>> arch.site(7, "mlp_act")                     # doctest: +SKIP
    Site(module='model.layers.7.mlp.down_proj', where='input')
    >>> get_arch(t5).site(0, "block_out", stack="encoder")   # doctest: +SKIP
    Site(module='encoder.block.0', where='output')
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, NamedTuple

import torch
from torch import nn

from .errors import ConfigError, UnsupportedModelError

SITE_NAMES: tuple[str, ...] = ("mlp_in", "mlp_act", "mlp_out_proj", "mlp_out", "block_out")
TOPOLOGIES: tuple[str, ...] = ("causal", "seq2seq")


class Site(NamedTuple):
    """A place in the forward pass: the input (first positional argument) or the output of the
    module named ``module``. Unpacks as ``module_name, where = site``."""

    module: str
    where: Literal["input", "output"]


@dataclass(frozen=True)
class StackLayout:
    """Module paths of one stack: the block list, and, relative to one block, the module whose
    input is the MLP input, the module whose output is the MLP output, and the MLP's output
    projection (a Linear or Conv1D)."""

    layers: str
    mlp_in: str
    mlp_out: str
    out_proj: str

    def relative_site(self, name: str) -> Site:
        """The site ``name`` relative to a block ("" names the block itself)."""
        table = {"mlp_in": Site(self.mlp_in, "input"), "mlp_act": Site(self.out_proj, "input"),
                 "mlp_out_proj": Site(self.out_proj, "output"), "mlp_out": Site(self.mlp_out, "output"),
                 "block_out": Site("", "output")}
        if name not in table:
            raise ConfigError(f"unknown site {name!r}; known sites: {', '.join(SITE_NAMES)}")
        return table[name]


@dataclass(frozen=True)
class FamilyLayout:
    """A family's topology and its stacks, in forward order; ``default_stack`` is the stack that
    the single-stack accessors (``layers()``, ``mlp_out_name(layer)``, ...) address."""

    topology: str
    stacks: dict[str, StackLayout]
    default_stack: str = "decoder"


def _mlp_stack(layers: str, mlp: str, out_proj: str) -> StackLayout:
    """A stack whose MLP is one container module ``mlp`` with output projection ``out_proj``."""
    return StackLayout(layers=layers, mlp_in=mlp, mlp_out=mlp, out_proj=f"{mlp}.{out_proj}")


def _causal(stack: StackLayout) -> FamilyLayout:
    return FamilyLayout(topology="causal", stacks={"decoder": stack})


# T5 blocks: layer[0] self-attention, (decoder only) layer[1] cross-attention, layer[-1] the FFN
# (``T5LayerFF``: norm -> DenseReluDense -> residual). DenseReluDense is wi (or gated wi_0/wi_1),
# activation, wo.
_T5_LIKE = FamilyLayout(topology="seq2seq", stacks={
    "encoder": _mlp_stack("encoder.block", "layer.1.DenseReluDense", "wo"),
    "decoder": _mlp_stack("decoder.block", "layer.2.DenseReluDense", "wo"),
})
_LLAMA_LIKE = _causal(_mlp_stack("model.layers", "mlp", "down_proj"))

FAMILIES: dict[str, FamilyLayout] = {
    "gpt2": _causal(_mlp_stack("transformer.h", "mlp", "c_proj")),
    "gptj": _causal(_mlp_stack("transformer.h", "mlp", "fc_out")),
    "gpt_neox": _causal(_mlp_stack("gpt_neox.layers", "mlp", "dense_4h_to_h")),
    "llama": _LLAMA_LIKE,
    "mistral": _LLAMA_LIKE,
    "qwen2": _LLAMA_LIKE,
    "gemma": _LLAMA_LIKE,
    "gemma2": _LLAMA_LIKE,       # mlp_out is before the post-feed-forward norm
    "gemma3_text": _LLAMA_LIKE,  # likewise
    # OPT's MLP is two loose Linear layers on the decoder layer: final_layer_norm -> fc1 -> act -> fc2.
    "opt": _causal(StackLayout(layers="model.decoder.layers", mlp_in="fc1", mlp_out="fc2", out_proj="fc2")),
    "t5": _T5_LIKE,
    "mt5": _T5_LIKE,
    "umt5": _T5_LIKE,
}


def is_conv1d(module: nn.Module) -> bool:
    """True for GPT-2 style ``Conv1D`` layers, whose weight is stored as (in, out)."""
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf")


def linear_dims(module: nn.Module) -> tuple[int, int]:
    """(in_features, out_features) of a Linear or Conv1D module."""
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    if is_conv1d(module):
        return module.weight.shape[0], module.weight.shape[1]
    raise UnsupportedModelError(f"expected a Linear or Conv1D module, got {type(module).__name__}")


def dense_delta(module: nn.Module, up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    """The dense weight change ``up @ down.T`` laid out like ``module.weight``."""
    delta = up @ down.T  # (out, in)
    return delta.T if is_conv1d(module) else delta


def is_seq2seq(model: nn.Module) -> bool:
    """True for encoder-decoder models (``config.is_encoder_decoder``)."""
    return bool(getattr(getattr(model, "config", None), "is_encoder_decoder", False))


class Arch:
    """Family-aware accessors for one model.

    Every method taking ``stack`` defaults to the family's default stack (``"decoder"``, which
    for causal models is the only one), so single-stack callers never name it.
    """

    def __init__(self, model: nn.Module):
        config = getattr(model, "config", None)
        model_type = getattr(config, "model_type", None)
        if model_type not in FAMILIES:
            raise UnsupportedModelError(
                f"model_type {model_type!r} is not supported; supported families: "
                f"{', '.join(sorted(FAMILIES))}. A method plugin may still support it.")
        self.model = model
        self.model_type: str = model_type
        self.layout = FAMILIES[model_type]

    # -- stacks ------------------------------------------------------------------------------
    @property
    def topology(self) -> str:
        """``"causal"`` (one decoder stack) or ``"seq2seq"`` (encoder and decoder stacks)."""
        return self.layout.topology

    @property
    def stacks(self) -> tuple[str, ...]:
        """Names of the stacks in forward order, e.g. ``("encoder", "decoder")``."""
        return tuple(self.layout.stacks)

    def stack(self, stack: str | None = None) -> StackLayout:
        """The layout of ``stack`` (default: the family's default stack)."""
        name = self.layout.default_stack if stack is None else stack
        if name not in self.layout.stacks:
            raise ConfigError(f"a {self.model_type} model has no {name!r} stack; its stacks are "
                              f"{', '.join(self.stacks)}")
        return self.layout.stacks[name]

    @property
    def num_layers(self) -> int:
        """Number of blocks of the default stack (see :meth:`num_blocks` for another stack)."""
        return self.num_blocks()

    def num_blocks(self, stack: str | None = None) -> int:
        return len(self.layers(stack))

    def layers(self, stack: str | None = None) -> nn.ModuleList:
        """The block list of ``stack``."""
        return self.model.get_submodule(self.stack(stack).layers)

    def check_layer(self, layer: int, stack: str | None = None) -> int:
        """Return ``layer`` if it indexes a block of ``stack``, else raise a clear error."""
        n = self.num_blocks(stack)
        if isinstance(layer, bool) or not isinstance(layer, int) or not 0 <= layer < n:
            where = "" if stack is None else f" {stack} stack"
            raise ConfigError(f"layer {layer!r} is outside this model{where}, which has {n} layers "
                              f"(valid: 0..{n - 1}); pass config={{'layer': ...}}")
        return layer

    def layer_name(self, layer: int, stack: str | None = None) -> str:
        """Dotted name of block ``layer`` of ``stack``."""
        return f"{self.stack(stack).layers}.{self.check_layer(layer, stack)}"

    def layer_of(self, name: str, stack: str | None = None) -> int | None:
        """Index of the block of ``stack`` that holds module ``name``, or None when it is outside
        every block.

        >>> get_arch(llama).layer_of("model.layers.3.mlp.down_proj")   # doctest: +SKIP
        3
        """
        prefix = self.stack(stack).layers + "."
        if not name.startswith(prefix):
            return None
        head = name[len(prefix):].split(".", 1)[0]
        return int(head) if head.isdigit() else None

    # -- sites -------------------------------------------------------------------------------
    def site(self, layer: int, name: str, stack: str | None = None) -> Site:
        """The named site (one of :data:`SITE_NAMES`) of block ``layer`` of ``stack``.

        >>> get_arch(opt).site(1, "mlp_act")            # doctest: +SKIP
        Site(module='model.decoder.layers.1.fc2', where='input')
        """
        rel = self.stack(stack).relative_site(name)
        block = self.layer_name(layer, stack)
        return Site(f"{block}.{rel.module}" if rel.module else block, rel.where)

    def sites(self, layer: int, stack: str | None = None) -> dict[str, Site]:
        """Every named site of block ``layer`` of ``stack``."""
        return {name: self.site(layer, name, stack) for name in SITE_NAMES}

    def site_width(self, name: str, stack: str | None = None) -> int:
        """Last-dimension size of the tensor at site ``name``: the inner (FFN) width for
        ``mlp_act``, the hidden width otherwise (read from the output projection's shape)."""
        self.stack(stack).relative_site(name)   # validates the name
        inner, hidden = linear_dims(self.module(f"{self.layer_name(0, stack)}.{self.stack(stack).out_proj}"))
        return inner if name == "mlp_act" else hidden

    def mlp_out_name(self, layer: int, stack: str | None = None) -> str:
        """Dotted name of the MLP output projection of block ``layer`` (site ``mlp_out_proj``)."""
        return self.site(layer, "mlp_out_proj", stack).module

    def module(self, name: str) -> nn.Module:
        try:
            return self.model.get_submodule(name)
        except AttributeError as e:
            raise ConfigError(f"module {name!r} does not exist in this {self.model_type} model") from e


def get_arch(model: nn.Module) -> Arch:
    """The :class:`Arch` of ``model``; raises :class:`UnsupportedModelError` for unknown families."""
    return Arch(model)


def site_tensor(value):
    """The hidden-state tensor carried at a site: ``value`` itself, or the first element of a
    tuple (a forward pre-hook's ``args``, or a block's tuple output)."""
    return value[0] if isinstance(value, tuple) else value


def replace_site_tensor(value, tensor: torch.Tensor):
    """``value`` with its hidden-state tensor (see :func:`site_tensor`) replaced by ``tensor``."""
    return (tensor,) + tuple(value[1:]) if isinstance(value, tuple) else tensor
