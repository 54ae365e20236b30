"""GRACE — General Retrieval Adaptors for Continual Editing.

Hartvigsen, Sankaranarayanan, Palangi, Kim, Ghassemi. "Aging with GRACE: Lifelong Model
Editing with Discrete Key-Value Adaptors", NeurIPS 2023 (arXiv:2211.11031).

A codebook C = {(k_i, v_i, ε_i, y_i)} wraps one layer l (here the MLP output projection):

    h^l = v_i   if  d(h^{l-1}, k_i) ≤ ε_i  for the nearest key k_i      (§3, "deferral")
    h^l = f^l(h^{l-1})  otherwise

An edit (x_t, y_t) with key k = h^{l-1}(x_t): if no key lies within ε_i + ε_init, add
(k, v, ε_init, y_t); if the nearest has the same label, **expand** its radius to reach k; if it
has another label, **split**: both radii become d/2 (§3.1). New values start at the layer's
output and are trained by gradient descent on the target's likelihood with the codebook in
place (the keys stay fixed). The base model is never changed.

Autoregressive targets: a target of m tokens is edited as m (key, label) pairs taken teacher-
forced at the positions that predict each target token (for m = 1 this is exactly the paper's
last-token key), so generation follows the whole target. Every token position is looked up,
which makes the codebook work unchanged with padding and KV caches.

Example:
    >>> model.add_edit("grace", request, name="memory")                  # doctest: +SKIP
    >>> model.add_edit("grace", another, name="memory", append=True)     # doctest: +SKIP
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch

import editpeft
from editpeft import EditRequest, MethodConfig, ModuleHookAdapter
from editpeft.arch import get_arch, linear_dims
from editpeft.attach import as_btd, capture_inputs, output_edit
from editpeft.codebook import Codebook
from editpeft.errors import AdapterFormatError
from editpeft.method import check
from editpeft.tokens import TargetBatch
from editpeft.train import TrainConfig, train_tensors

logger = logging.getLogger(__name__)


@dataclass
class GraceConfig(MethodConfig):
    layer: int = field(default=20, metadata={"help": "decoder block whose MLP output projection is wrapped"})
    eps_init: float = field(default=1.0, metadata={"help": "initial deferral radius of a new key"})
    lr: float = field(default=1.0, metadata={"help": "Adam learning rate of the values"})
    steps: int = field(default=100, metadata={"help": "maximum training steps per edit"})
    stop_loss: float = field(default=0.02, metadata={"help": "stop training below this mean NLL"})

    layer_fields = ("layer",)

    def validate(self) -> None:
        check(isinstance(self.layer, int) and self.layer >= 0, f"layer must be a non-negative int, got {self.layer!r}")
        check(self.eps_init > 0, "eps_init must be > 0")
        check(self.lr > 0, "lr must be > 0")
        check(self.steps >= 1, "steps must be >= 1")


class GraceAdapter(ModuleHookAdapter):
    """One codebook at one module's output."""

    def __init__(self, codebook: Codebook, **common: Any):
        super().__init__(**common)
        self.codebook = codebook
        self._live: Codebook | None = None

    def state_dict(self) -> dict[str, torch.Tensor]:
        b = self.codebook
        return {"keys": b.keys, "values": b.values, "radii": b.radii, "labels": b.labels}

    @classmethod
    def from_saved(cls, tensors, extra, **common) -> "GraceAdapter":
        try:
            book = Codebook.checked(tensors["keys"], tensors["values"], tensors["radii"], tensors["labels"])
        except KeyError as e:
            raise AdapterFormatError(f"GRACE tensor {e.args[0]!r} is missing from the adapter file") from None
        except ValueError as e:
            raise AdapterFormatError(f"the GRACE codebook is malformed: {e}") from None
        if len(common.get("targets") or []) != 1:
            raise AdapterFormatError(f"a GRACE adapter has exactly one target module; got {common.get('targets')}")
        return cls(book, **common)

    def prepare(self, state) -> None:
        module = state.module(self.targets[0])
        d_in, d_out = linear_dims(module)
        if self.codebook.keys.shape[1] != d_in or self.codebook.values.shape[1] != d_out:
            raise AdapterFormatError(f"the GRACE codebook is {self.codebook.keys.shape[1]}->"
                                     f"{self.codebook.values.shape[1]} but {self.targets[0]!r} is "
                                     f"{d_in}->{d_out}: this adapter was made for another model")
        self._live = self.codebook.to(module.weight.device)

    def transform(self, target, inputs, output):
        if self._live is None or self._live.keys.device != inputs.device:   # the model moved
            self._live = self.codebook.to(inputs.device)
        return self._live.replace(inputs, output)

    def __len__(self) -> int:
        return len(self.codebook)


class Grace(editpeft.EditMethod):
    name = "grace"
    kind = "module_hook"
    topologies = ("causal", "seq2seq")
    Config = GraceConfig
    adapter_class = GraceAdapter

    def targets(self, model, config: GraceConfig) -> list[str]:
        return [get_arch(model).mlp_out_name(config.layer)]

    def compute(self, model, tokenizer, requests: Sequence[EditRequest], config: GraceConfig) -> GraceAdapter:
        (target,) = self.targets(model, config)
        d_in, d_out = linear_dims(model.get_submodule(target))
        empty = GraceAdapter(Codebook.empty(d_in, d_out), method=self.name, hparams=config.to_dict(),
                             requests=[], targets=[target])
        return self.extend(empty, model, tokenizer, requests, config)

    def extend(self, adapter: GraceAdapter, model, tokenizer, requests, config) -> GraceAdapter:
        target = adapter.targets[0]
        module = model.get_submodule(target)
        book = adapter.codebook
        # The attached codebook (if any) is switched off while we train: the new codebook
        # replaces it as a whole, so its entries are applied by the training hook instead.
        with adapter.switched_off():
            for request in requests:
                book = _edit_one(model, tokenizer, module, book, request, config)
        return GraceAdapter(book, method=self.name, hparams=config.to_dict(),
                            requests=adapter.requests + list(requests), targets=[target])


def _edit_one(model, tokenizer, module, book: Codebook, request: EditRequest, config: GraceConfig) -> Codebook:
    device = next(model.parameters()).device
    batch = TargetBatch.for_model(model, tokenizer, [request.prompt], [request.target_new], device=device)
    positions = batch.target_positions(0).to(device)
    captured: list = []
    outputs: dict[str, torch.Tensor] = {}
    with torch.no_grad(), capture_inputs(module, captured), output_edit(module, lambda x, out: _keep(outputs, out)):
        model(**batch.model_inputs(), use_cache=False)
    keys = as_btd(captured[-1], batch.decoder_ids)[0, positions]
    init_values = as_btd(outputs["out"], batch.decoder_ids)[0, positions]
    trainable: list[int] = []
    for key, label, value in zip(keys, batch.target_ids[0], init_values):
        book, idx = book.insert(key, label, config.eps_init, value)
        if idx is not None:
            trainable.append(idx)
    if trainable:
        book = _train_values(model, module, batch, book, trainable, config)
    return book


def _keep(store: dict, out: torch.Tensor) -> torch.Tensor:
    store["out"] = out.detach()
    return out


def _train_values(model, module, batch: TargetBatch, book: Codebook, trainable: list[int],
                  config: GraceConfig) -> Codebook:
    device = next(model.parameters()).device
    live = book.to(device)
    idx = torch.tensor(trainable, device=device)

    def loss(params: dict[str, torch.Tensor]) -> torch.Tensor:
        values = live.values.index_put((idx,), params["values"])
        with output_edit(module, lambda x, out: live.replace(x, out, values)):
            return batch.target_nll(model(**batch.model_inputs(), use_cache=False).logits)

    result = train_tensors({"values": live.values[idx]}, loss,
                           TrainConfig(steps=config.steps, lr=config.lr, stop_loss=config.stop_loss,
                                       desc="grace values"))
    new_values = book.values.clone()
    new_values[torch.tensor(trainable)] = result.params["values"].float().cpu()
    return Codebook(book.keys, new_values, book.radii, book.labels)
