"""CaliNet — calibration memory slots beside a feed-forward layer.

Dong, Dai, Song, Xu, Sui, Li. "Calibrating Factual Knowledge in Pretrained Language Models",
Findings of EMNLP 2022 (arXiv:2210.03329).

A feed-forward layer is a key-value memory, ``FFN(H) = act(H Kᵀ) V`` with K, V ∈ R^{d_m × d}.
CaliNet puts a second, small memory of d_c *calibration memory slots* beside it, with the same
form, and adds the two outputs; the base model is frozen and only the slots are trained on the
facts to calibrate:

    FFN_c(H)  = act(H K_cᵀ) V_c                    K_c, V_c ∈ R^{d_c × d}
    FFN'(H)   = FFN(H) + FFN_c(H)

H is the host FFN's input (after the block's pre-FFN norm), so the slots read exactly what the
host's keys read. The paper's defaults, used here: d_c = 64 slots (``slots``), in the last FFN of
the stack that predicts the answer (the reference runs calibrate the last decoder block of T5;
``layers: [-1]``), learning rate 1e-2 (the reference runs train with Adafactor at a constant
1e-2; Adam here, the loop every editpeft method shares). Several layers may be calibrated at once
(``layers``); one adapter holds the slots of all of them.

**Slot form.** The paper writes FFN_c with the same activation as the FFN it calibrates; its
reference code builds the calibration FFN in the host's own form — a ReLU FFN beside T5's ReLU
FFN, a gated-GELU one (``act(H K_cᵀ) ⊙ (H G_cᵀ)``) beside T5 v1.1's gated FFN. So by default
(``activation: host``, ``gated: null``) the slots copy the host: GLU families (llama, mistral,
qwen2: SwiGLU; gemma, gemma3: GeGLU; mT5/UMT5) get gated slots ``FFN_c(H) = (act(H K_cᵀ) ⊙ H G_cᵀ)
V_c`` with the host's act — a slot is then a neuron of the host's own kind, and the gate lets a
slot's output change sign with the input as the host's neurons can — while plain families
(gpt2, gptj, gpt_neox, opt, t5) get plain slots with their activation. A gated slot at a
random key is never exactly silent (SiLU/GELU are non-zero almost everywhere), like the host's
own neurons; the calibration is spread over all slots, not routed (see *locality* below).

**Training.** All requests of one call form one batch (the paper calibrates 100 or 1,000 facts
jointly): the loss is the teacher-forced target NLL, averaged per request; with
``train_on_paraphrases`` each request's paraphrases are added as further rows (the paper trains
on ParaRel paraphrases of each fact; off by default, so that paraphrase scores in the harness
measure generalization). Keys (and gates) start uniform in ±1/√d (PyTorch's Linear
initialisation, which the reference code leaves the slots at); values start at **zero** — unlike
the reference code, whose random values change the model before any training — so an untrained
adapter is exactly the base model and training starts from it (LoRA's convention).

**Append** (``append=True``). The paper's memory is one fixed set of slots that holds every
calibrated fact, trained on all of them together. Appending therefore trains the *same* slots
further (no slots are added), starting from where they are, on the new requests together with
earlier requests of the adapter, which it stores: ``replay: null`` replays them all — the
paper's joint objective, exact, with a cost per step that grows with the number of facts —
``replay: k`` replays a seeded sample of k of them (bounded cost for long sequences; the earlier
facts not drawn are kept only as far as the new training does not overwrite them), ``replay: 0``
none.

**Speed.** Slots in the last block change only what that block adds to the residual stream, so
each step replays the final norm and the head on the captured last-block output
(:class:`editpeft.suffix.LastBlockReplay`, checked against the model's logits); slots lower down
(and slots behind Gemma 2/3's post-FFN norm, where that replay's check fails) replay the blocks
from the lowest calibrated one (:class:`editpeft.suffix.BlockSuffix`); encoder-decoder models run
the full model. Behind a post-FFN norm the slots' output is normalised with the host's, which
bounds what slots in the last block can add (on a tiny Gemma 3 the edit does not reach top-1
there): an earlier layer is the choice for those families.

**Locality.** Nothing in the paper's objective keeps the slots silent on other inputs: the
values learnt for the edits are added, weighted by the slots' activations, wherever the host FFN
runs. Unrelated prompts therefore move more than under ROME or T-Patcher (measured in
``cards/calinet/llama.yaml``).

Example:
    >>> model.add_edit("calinet", requests, name="calibration")                    # doctest: +SKIP
    >>> model.add_edit("calinet", more, name="calibration", append=True)            # doctest: +SKIP
"""
from __future__ import annotations

import logging
import math
import random
from contextlib import ExitStack
from dataclasses import dataclass, field
from typing import Sequence

import torch

import editpeft
from editpeft import EditRequest, MethodConfig
from editpeft.arch import get_arch
from editpeft.errors import AdapterFormatError, ConfigError, EditError
from editpeft.finetune import training_pairs
from editpeft.method import check, model_topology
from editpeft.patches import PatchNeuronAdapter, PatchNeurons, PatchSite, activation_fn, temporary_patch
from editpeft.suffix import BlockSuffix, LastBlockReplay
from editpeft.tokens import TargetBatch, model_device
from editpeft.train import TrainConfig, train_tensors

logger = logging.getLogger(__name__)

#: Config fields that name the host FFN's activation, in the order transformers' families use them.
ACTIVATION_FIELDS = ("hidden_activation", "hidden_act", "activation_function", "dense_act_fn")
#: Names of the gate projection of a gated (GLU) host FFN: llama-like ``gate_proj``, T5 v1.1 ``wi_0``.
GATE_NAMES = ("gate_proj", "wi_0")


@dataclass
class CaliNetConfig(MethodConfig):
    layers: list[int] = field(default_factory=lambda: [-1], metadata={
        "help": "blocks whose FFN gets calibration slots (-1: the last, the paper's choice; the decoder of "
                "encoder-decoder models)"})
    slots: int = field(default=64, metadata={"help": "d_c: calibration memory slots per FFN (paper: 64)"})
    activation: str = field(default="host", metadata={
        "help": "the slots' activation: 'host' (the host FFN's, as the reference code) or a transformers name"})
    gated: bool | None = field(default=None, metadata={
        "help": "gated slots act(x·k) ⊙ (x·g) (null: as the host FFN, gated for GLU families such as SwiGLU)"})
    steps: int = field(default=100, metadata={"help": "Adam steps at most per call"})
    lr: float = field(default=1e-2, metadata={"help": "Adam learning rate (paper: 1e-2, Adafactor)"})
    weight_decay: float = field(default=0.0, metadata={"help": "Adam weight decay"})
    stop_loss: float = field(default=0.05, metadata={"help": "stop once the mean target NLL is below this"})
    train_on_paraphrases: bool = field(default=False, metadata={
        "help": "also train on each request's paraphrases (the paper's calibration data are paraphrases)"})
    replay: int | None = field(default=None, metadata={
        "help": "append: earlier requests trained again with the new ones (null: all, the paper's joint "
                "objective; k: a seeded sample of k; 0: none)"})
    seed: int = field(default=0, metadata={"help": "seed of the slots' initialisation and the replay sample"})

    layer_fields = ("layers",)

    def validate(self) -> None:
        check(len(self.layers) >= 1 and all(x >= -1 for x in self.layers),
              f"layers must be a non-empty list of block indices (or -1, the last), got {self.layers}")
        check(self.slots >= 1, f"slots must be >= 1, got {self.slots}")
        check(self.steps >= 1, f"steps must be >= 1, got {self.steps}")
        check(self.lr > 0 and self.stop_loss > 0, "lr and stop_loss must be > 0")
        check(self.weight_decay >= 0, f"weight_decay must be >= 0, got {self.weight_decay}")
        check(self.replay is None or self.replay >= 0, f"replay must be null or >= 0, got {self.replay}")
        if self.activation != "host":
            activation_fn(self.activation)


def _stack(model) -> str | None:
    """The stack that predicts the answer: the decoder of an encoder-decoder model."""
    return "decoder" if model_topology(model) == "seq2seq" else None


def _sites(model, config: CaliNetConfig) -> list[PatchSite]:
    arch, stack = get_arch(model), _stack(model)
    n = arch.num_blocks(stack)
    layers = [n - 1 if x == -1 else arch.check_layer(x, stack) for x in config.layers]
    if len(set(layers)) != len(layers):
        raise ConfigError(f"layers {config.layers} name a block twice on this {n}-layer model; list each once")
    return [PatchSite.ffn(model, layer, stack) for layer in layers]


def host_form(model, site: PatchSite) -> tuple[str, bool]:
    """(activation name, gated) of the host FFN at ``site``, read from the model's config and the
    FFN's modules (a gate projection means a GLU: SwiGLU, gated GELU)."""
    config = model.config
    name = next((v for v in (getattr(config, f, None) for f in ACTIVATION_FIELDS) if isinstance(v, str)), None)
    if name is None:
        raise ConfigError(f"cannot tell this {config.model_type} model's FFN activation; pass config="
                          "{'activation': 'gelu'} (or the activation it uses)")
    name = name.removeprefix("gated-")            # T5 v1.1's feed_forward_proj spelling
    mlp = model.get_submodule(site.write)
    gated = bool(getattr(config, "is_gated_act", False)) or any(hasattr(mlp, g) for g in GATE_NAMES)
    return name, gated


def _slot_form(model, site: PatchSite, config: CaliNetConfig) -> tuple[str, bool]:
    """(activation, gated) of the slots at ``site``: the config's, or the host FFN's where it says so."""
    host = host_form(model, site) if config.activation == "host" or config.gated is None else None
    activation = host[0] if config.activation == "host" else config.activation
    activation_fn(activation)
    return activation, host[1] if config.gated is None else config.gated


def fresh_slots(d_in: int, d_out: int, n: int, *, gated: bool, activation: str,
                generator: torch.Generator) -> PatchNeurons:
    """n slots: keys (and gates) uniform in ±1/√d_in (torch's Linear initialisation), zero bias, zero values."""
    bound = 1.0 / math.sqrt(d_in)
    draw = lambda: torch.rand(n, d_in, generator=generator) * (2 * bound) - bound  # noqa: E731
    keys = draw()
    gate = draw() if gated else None
    return PatchNeurons(keys, torch.zeros(n), torch.zeros(n, d_out), gate, activation=activation)


class _Objective:
    """The mean teacher-forced target NLL of a batch of (prompt, target) rows with given slots in
    place: logits at the target positions only, from the cheapest exact path (last-block replay,
    block suffix, or the full model)."""

    def __init__(self, model, tokenizer, sites: list[PatchSite], prompts: list[str], targets: list[str]):
        self.model, self.sites = model, sites
        self.batch = TargetBatch.for_model(model, tokenizer, prompts, targets)
        device = self.batch.input_ids.device
        self.where = self.batch.target_where()
        inputs = self.batch.model_inputs()
        self.replay = self.suffix = None
        if model_topology(model) == "causal":
            if len(sites) == 1:
                self.replay = LastBlockReplay.capture(model, sites[0].read, sites[0].write, inputs, self.where)
            if self.replay is None:
                arch = get_arch(model)
                start = min(arch.layer_of(s.write) for s in sites)
                self.suffix = BlockSuffix.capture(model, start, inputs, self.where.to(device))
        logger.debug("calinet: %s path", "replay" if self.replay else "suffix" if self.suffix else "full-model")

    def logits(self, patches: dict[PatchSite, PatchNeurons]) -> torch.Tensor:
        """(target positions, vocab) logits with ``patches`` at their sites."""
        if self.replay is not None:
            ((_, patch),) = patches.items()
            return self.replay.logits(patch(self.replay.inputs))
        with ExitStack() as stack:
            for site, patch in patches.items():
                stack.enter_context(temporary_patch(self.model, site, patch))
            if self.suffix is not None:
                return self.suffix.logits(self.where.to(self.suffix.hidden.device))
            logits = self.model(**self.batch.model_inputs(), use_cache=False).logits
        return logits[self.where[:, 0].to(logits.device), self.where[:, 1].to(logits.device)]

    def nll(self, patches: dict[PatchSite, PatchNeurons]) -> torch.Tensor:
        """Mean over rows of each row's mean target-token NLL."""
        return self.batch.flat_target_nll(self.logits(patches))


class CaliNetAdapter(PatchNeuronAdapter):
    """Calibration slots (patch neurons without a trained bias) at one or more FFNs; saved as
    :class:`~editpeft.patches.PatchNeuronAdapter`. Before attaching, each FFN's slots must have the
    form the adapter's hparams give on the model (a slots file stripped of its gate, or with another
    activation, computes something else and is refused)."""

    def prepare(self, state) -> None:
        super().prepare(state)
        try:
            config = CaliNetConfig.from_dict(self.hparams)
        except EditError as e:
            raise AdapterFormatError(f"the adapter's hparams are not a CaliNet config: {e}") from None
        for site, slots in self.patches.items():
            activation, gated = _slot_form(state.model, site, config)
            if (slots.activation, slots.gate is not None) != (activation, gated):
                raise AdapterFormatError(
                    f"the slots at {site.write!r} are {'gated ' if slots.gate is not None else ''}{slots.activation} "
                    f"but this adapter's hparams give {'gated ' if gated else ''}{activation} on this model: the "
                    "file was altered or made for another model; recompute the edit")


class CaliNet(editpeft.EditMethod):
    name = "calinet"
    kind = "module_hook"
    Config = CaliNetConfig
    adapter_class = CaliNetAdapter
    topologies = ("causal", "seq2seq")

    def targets(self, model, config: CaliNetConfig) -> list[str]:
        return list(dict.fromkeys(m for s in _sites(model, config) for m in (s.read, s.write)))

    def compute(self, model, tokenizer, requests: Sequence[EditRequest], config: CaliNetConfig) -> CaliNetAdapter:
        arch, stack = get_arch(model), _stack(model)
        d_in, d_out = arch.site_width("mlp_in", stack), arch.site_width("mlp_out", stack)
        generator = torch.Generator().manual_seed(config.seed)
        start = {}
        for site in _sites(model, config):
            activation, gated = _slot_form(model, site, config)
            start[site] = fresh_slots(d_in, d_out, config.slots, gated=gated, activation=activation,
                                      generator=generator)
        patches = self._train(model, tokenizer, start, list(requests), config)
        return CaliNetAdapter(patches, method=self.name, hparams=config.to_dict(), requests=list(requests))

    def extend(self, adapter: CaliNetAdapter, model, tokenizer, requests: Sequence[EditRequest],
               config: CaliNetConfig) -> CaliNetAdapter:
        sites = _sites(model, config)
        if set(sites) != set(adapter.patches):
            raise ConfigError(f"append trains the adapter's own slots at {[s.write for s in adapter.patches]}; the "
                              f"config asks for {[s.write for s in sites]}. Keep its layers, or add a new edit")
        earlier = list(adapter.requests)
        if config.replay is not None and config.replay < len(earlier):
            rng = random.Random(f"{config.seed}:{len(earlier)}")      # a fresh, reproducible draw per append
            earlier = [earlier[i] for i in sorted(rng.sample(range(len(earlier)), config.replay))]
        with adapter.switched_off():   # its slots are trained further below; they must not count twice
            patches = self._train(model, tokenizer, dict(adapter.patches), [*earlier, *requests], config)
        return CaliNetAdapter(patches, method=self.name, hparams=config.to_dict(),
                                  requests=[*adapter.requests, *requests])

    def _train(self, model, tokenizer, start: dict[PatchSite, PatchNeurons], requests: list[EditRequest],
               config: CaliNetConfig) -> dict[PatchSite, PatchNeurons]:
        """Train the slots ``start`` on ``requests`` (all in one batch); returns the trained slots."""
        device = model_device(model)
        sites = list(start)
        objective = _Objective(model, tokenizer, sites, *training_pairs(requests, config.train_on_paraphrases))
        names = ("keys", "values") + (("gate",) if start[sites[0]].gate is not None else ())
        params = {f"{i}.{k}": getattr(start[s], k).to(device, torch.float32)
                  for i, s in enumerate(sites) for k in names}

        def slots(p: dict[str, torch.Tensor]) -> dict[PatchSite, PatchNeurons]:
            return {s: start[s].with_tensors(key_bias=start[s].key_bias.to(device),
                                             **{k: p[f"{i}.{k}"] for k in names}) for i, s in enumerate(sites)}

        result = train_tensors(params, lambda p: {"target": objective.nll(slots(p))},
                               TrainConfig(steps=config.steps, lr=config.lr, weight_decay=config.weight_decay,
                                           stop_loss=config.stop_loss, desc="calinet"))
        logger.info("calinet: %d rows, %d steps, target NLL %.4f", len(objective.batch.target_ids), result.steps,
                    result.loss)
        return {s: p.with_tensors(**{k: v.cpu() for k, v in p.tensors().items()})
                for s, p in slots(result.params).items()}
