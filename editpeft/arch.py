"""Where things live in each supported model family.

The family is chosen by ``config.model_type`` (never by a substring of the model's name).

Example:
    >>> arch = get_arch(model)                      # doctest: +SKIP
    >>> arch.mlp_out_name(7)                        # doctest: +SKIP
    'model.layers.7.mlp.down_proj'
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .errors import ConfigError, UnsupportedModelError


@dataclass(frozen=True)
class FamilySpec:
    """Module paths of one family: the decoder-block list and the MLP output projection."""

    layers: str
    mlp_out: str


_LLAMA_LIKE = FamilySpec(layers="model.layers", mlp_out="mlp.down_proj")

FAMILIES: dict[str, FamilySpec] = {
    "gpt2": FamilySpec(layers="transformer.h", mlp_out="mlp.c_proj"),
    "gptj": FamilySpec(layers="transformer.h", mlp_out="mlp.fc_out"),
    "gpt_neox": FamilySpec(layers="gpt_neox.layers", mlp_out="mlp.dense_4h_to_h"),
    "llama": _LLAMA_LIKE,
    "mistral": _LLAMA_LIKE,
    "qwen2": _LLAMA_LIKE,
    "gemma": _LLAMA_LIKE,
    "gemma2": _LLAMA_LIKE,
    "gemma3_text": _LLAMA_LIKE,
    "opt": FamilySpec(layers="model.decoder.layers", mlp_out="fc2"),
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


class Arch:
    """Family-aware accessors for one model."""

    def __init__(self, model: nn.Module):
        config = getattr(model, "config", None)
        model_type = getattr(config, "model_type", None)
        if model_type not in FAMILIES:
            raise UnsupportedModelError(
                f"model_type {model_type!r} is not supported; supported families: "
                f"{', '.join(sorted(FAMILIES))}. A method plugin may still support it.")
        self.model = model
        self.model_type: str = model_type
        self.spec = FAMILIES[model_type]

    @property
    def num_layers(self) -> int:
        return len(self.layers())

    def layers(self) -> nn.ModuleList:
        return self.model.get_submodule(self.spec.layers)

    def check_layer(self, layer: int) -> int:
        """Return ``layer`` if it indexes a decoder block, else raise a clear error."""
        n = self.num_layers
        if not isinstance(layer, int) or not 0 <= layer < n:
            raise ConfigError(f"layer {layer!r} is outside this model, which has {n} layers "
                              f"(valid: 0..{n - 1}); pass config={{'layer': ...}}")
        return layer

    def layer_name(self, layer: int) -> str:
        return f"{self.spec.layers}.{self.check_layer(layer)}"

    def mlp_out_name(self, layer: int) -> str:
        """Dotted name of the MLP output projection of decoder block ``layer``."""
        return f"{self.layer_name(layer)}.{self.spec.mlp_out}"

    def module(self, name: str) -> nn.Module:
        try:
            return self.model.get_submodule(name)
        except AttributeError as e:
            raise ConfigError(f"module {name!r} does not exist in this {self.model_type} model") from e


def get_arch(model: nn.Module) -> Arch:
    """The :class:`Arch` of ``model``; raises :class:`UnsupportedModelError` for unknown families."""
    return Arch(model)
