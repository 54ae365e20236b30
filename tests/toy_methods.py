"""Small real methods of the three module-level building blocks, trained with the core's loop:
a dense delta, patch neurons, and a side module. They edit for real (the target becomes likely)
and exist to run the plugin contract suite on every family; register them with
``editpeft.registry.registered``."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import nn

import editpeft
from editpeft import MethodConfig
from editpeft.adapters import ModuleHookAdapter, WeightDeltaAdapter
from editpeft.arch import get_arch, linear_dims
from editpeft.attach import output_edit
from editpeft.deltas import DenseDelta
from editpeft.errors import AdapterFormatError
from editpeft.patches import PatchNeuronAdapter, PatchNeurons, PatchSite, temporary_patch
from editpeft.tokens import TargetBatch, model_device
from editpeft.train import TrainConfig, train_tensors


@dataclass
class ToyConfig(MethodConfig):
    layer: int = field(default=0, metadata={"help": "block to edit (-1: the last)"})
    steps: int = field(default=200, metadata={"help": "training steps (early stop at a target NLL of 0.05)"})
    lr: float = field(default=0.05, metadata={"help": "Adam learning rate"})


def _batch(model, tokenizer, requests) -> TargetBatch:
    return TargetBatch.for_model(model, tokenizer, [r.prompt for r in requests], [r.target_new for r in requests],
                                 device=model_device(model))


def _layer(model, config: ToyConfig) -> int:
    arch = get_arch(model)
    return arch.num_layers - 1 if config.layer < 0 else arch.check_layer(config.layer)


def _nll(model, batch: TargetBatch) -> torch.Tensor:
    return batch.target_nll(model(**batch.model_inputs(), use_cache=False).logits)


def _train_projection_output(model, tokenizer, requests, config: ToyConfig, name: str, start: torch.Tensor,
                             output: Callable) -> tuple[str, torch.Tensor]:
    """Train ``w`` (from ``start``) so that the MLP output projection's output ``output(x, out, w)``
    makes the targets likely; returns (projection name, trained w)."""
    target = get_arch(model).mlp_out_name(_layer(model, config))
    module = model.get_submodule(target)
    batch = _batch(model, tokenizer, requests)

    def loss(p):
        with output_edit(module, lambda x, out: output(x, out, p["w"])):
            return _nll(model, batch)
    result = train_tensors({"w": start}, loss, TrainConfig(steps=config.steps, lr=config.lr * 0.1, stop_loss=0.05,
                                                            desc=name))
    return target, result.params["w"]


def _projection(model, config: ToyConfig):
    module = model.get_submodule(get_arch(model).mlp_out_name(_layer(model, config)))
    return module, *linear_dims(module)


class ToyDense(editpeft.EditMethod):
    """Fine-tunes a dense change of one MLP output projection."""

    name, kind, Config, adapter_class = "toy-dense", "weight_delta", ToyConfig, WeightDeltaAdapter
    topologies = ("causal", "seq2seq")

    def compute(self, model, tokenizer, requests, config: ToyConfig):
        _, d_in, d_out = _projection(model, config)
        target, w = _train_projection_output(model, tokenizer, requests, config, self.name, torch.zeros(d_out, d_in),
                                             lambda x, out, w: out + nn.functional.linear(x, w))
        return WeightDeltaAdapter({target: DenseDelta(w)}, method=self.name, hparams=config.to_dict(),
                                  requests=list(requests))


class ToyPatch(editpeft.EditMethod):
    """One patch neuron per request at one FFN: key = the FFN input at the prompt's last token."""

    name, kind, Config, adapter_class = "toy-patch", "module_hook", ToyConfig, PatchNeuronAdapter
    topologies = ("causal", "seq2seq")

    def compute(self, model, tokenizer, requests, config: ToyConfig):
        site = PatchSite.ffn(model, _layer(model, config))
        batch = _batch(model, tokenizer, requests)
        captured: list[torch.Tensor] = []
        handle = model.get_submodule(site.read).register_forward_pre_hook(lambda m, a: captured.append(a[0]))
        try:
            with torch.no_grad():
                model(**batch.model_inputs(), use_cache=False)
        finally:
            handle.remove()
        ids = batch.decoder_ids
        x = captured[-1].reshape(ids.shape[0], ids.shape[1], -1)
        keys = torch.stack([x[i, batch.last_prompt[i]] for i in range(len(requests))]).float()
        keys = keys / keys.norm(dim=-1, keepdim=True) ** 2          # activation 1 at the key itself
        bias = torch.zeros(len(requests))
        d_out = get_arch(model).site_width("mlp_out")
        template = PatchNeurons(keys, bias - 0.5, torch.zeros(len(requests), d_out), activation="relu")

        def loss(p):
            with temporary_patch(model, site, template.with_tensors(values=p["values"])):
                return _nll(model, batch)
        result = train_tensors({"values": template.values}, loss,
                               TrainConfig(steps=config.steps, lr=config.lr * 10, stop_loss=0.05, desc=self.name))
        patch = template.with_tensors(values=result.params["values"])
        return PatchNeuronAdapter({site: patch}, method=self.name, hparams=config.to_dict(), requests=list(requests))


class SideModuleAdapter(ModuleHookAdapter):
    """Replaces a Linear's output by a trained side copy of it (an ``nn.Linear`` it owns)."""

    def __init__(self, side: nn.Linear, **common: Any):
        super().__init__(**common)
        self.side = side

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {f"side.{k}": v.detach().contiguous() for k, v in self.side.state_dict().items()}

    @classmethod
    def from_saved(cls, tensors, extra, **common):
        if "side.weight" not in tensors or tensors["side.weight"].ndim != 2:
            raise AdapterFormatError("side.weight (out, in) is missing from the adapter file")
        w = tensors["side.weight"]
        side = nn.Linear(w.shape[1], w.shape[0], bias="side.bias" in tensors)
        side.load_state_dict({k[5:]: v for k, v in tensors.items()})
        return cls(side.requires_grad_(False), **common)

    def transform(self, target, inputs, output):
        w = self.side.weight.to(inputs)
        b = self.side.bias.to(inputs) if self.side.bias is not None else None
        return nn.functional.linear(inputs, w, b).to(output.dtype)


class ToySide(editpeft.EditMethod):
    """Trains a side copy of one MLP output projection (the base projection is never touched)."""

    name, kind, Config, adapter_class = "toy-side", "module_hook", ToyConfig, SideModuleAdapter
    topologies = ("causal", "seq2seq")

    def compute(self, model, tokenizer, requests, config: ToyConfig):
        module, d_in, d_out = _projection(model, config)
        weight = module.weight.detach().float()
        weight = weight.T if weight.shape != (d_out, d_in) else weight       # Conv1D stores (in, out)
        bias = module.bias.detach().float() if getattr(module, "bias", None) is not None else None
        target, w = _train_projection_output(model, tokenizer, requests, config, self.name, weight.clone(),
                                             lambda x, out, w: nn.functional.linear(x, w, bias).to(out.dtype))
        side = nn.Linear(d_in, d_out, bias=bias is not None)
        with torch.no_grad():
            side.weight.copy_(w)
            if bias is not None:
                side.bias.copy_(bias)
        return SideModuleAdapter(side.requires_grad_(False), method=self.name, hparams=config.to_dict(),
                                 requests=list(requests), targets=[target])


TOY_METHODS = (ToyDense, ToyPatch, ToySide)
