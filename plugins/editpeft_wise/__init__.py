"""WISE — a side memory for lifelong editing, routed by its activation.

Wang, Li, Yao, Zhang, Xie, Chen, Li, Chen, Zhang. "WISE: Rethinking the Knowledge Memory for
Lifelong Model Editing", NeurIPS 2024 (arXiv:2405.14768).

**Side memory** (§2.2). One FFN's value (output) projection W_v of a late block is copied into a
side memory W_v' that takes every edit; W_v (the *main memory*) is never changed. For an input
whose FFN activation (the projection's input) is a(x), the

    activation score    Δ_act(x) = ‖a(x) · (W_v' − W_v)‖₂                                (Eq. 3)

is large where the side memory was edited for x and small elsewhere; for a whole input it is the
mean of the per-token scores over the input's tokens (the reference code's rule). **Routing**
(Eq. 4): the side memory answers an input when its Δ_act reaches ε, the main memory otherwise,
with ε = ``act_ratio`` × the smallest score any edit reached when it was made (the reference rule).

**Training** (Eq. 5). Each edit trains W_v' (through the delta D = W_v' − W_v, base model frozen)
on the edit's teacher-forced target NLL plus the routing margins

    L_a = ReLU(Δ_act(x_i) − α) + ReLU(β − Δ_act(x_e)) + ReLU(γ − (Δ_act(x_e) − Δ_act(x_i)))

over the edit's inputs x_e and irrelevant inputs x_i (α: irrelevant scores stay below it; β: edit
scores rise above it; γ: the gap), each hinge averaged over its violated terms as in the reference
code; SGD (lr 1.0, weight decay 1e-5), every entry of D kept within ±``norm_constraint``.

**Knowledge sharding and merging** (§2.3). Edits go into shards of ``shard_size`` edits; each shard
trains only the entries of a random mask M_i of density ρ (``mask_ratio``): ∇D ← M_i ⊙ ∇D, so
shards write mostly disjoint subspaces. Every ``merge_every`` edits the shards' deltas τ_i are
merged with TIES (Yadav et al. 2023: keep each τ_i's ``merge_density`` largest magnitudes, elect
each entry's sign by the sum, average the entries that agree) into one merged memory — together
with the previous merged memory when there is one (weights 0.6 for it and 0.4 shared by the new
shards, as the reference code does).

Choices where the paper leaves the detail open, and why:

- **One decision per row, kept for the whole sequence.** The adapter is a router
  (:class:`editpeft.RouterAdapter`): ``decide`` scores each row of a batch from its own tokens
  (padding excluded, positions as the row would have alone) and the side memory then serves every
  token of the rows in scope, generated tokens included. The reference code decides once per
  batch from a mean that includes padding; per row, a prompt's answer does not depend on what it
  is batched with.
- **The edit's inputs** x_e are its prompt alone (what ``generate`` decides on) and its prompt with
  the target teacher-forced (what a scoring forward decides on); both must score above β. The side
  memory is applied on every token of the edit while training, as routing applies it.
- **Irrelevant inputs** are ``irrelevant_tokens`` tokens of unrelated text (a built-in corpus) cut
  into sequences of ``irrelevant_len`` tokens, every prefix of at least two tokens scored as an
  input of its own (prompts come in every length; the first tokens of a sequence score high); the
  same for every edit. The reference code pairs each edit with one unrelated dataset sample.
- **Several memories.** Inference scores the merged memory and every shard not yet merged and
  takes the highest score (the reference code's WISE-Retrieve rule), so an edit is served from the
  moment it is made, also between merges.

**Measured on SmolLM2-135M** (``cards/wise/llama.yaml``): the paper's SGD at lr 1.0 does not learn
a target in 70 steps here, so the card uses Adam. The activation score does not separate edits
from unrelated questions well at this scale: after 10 sequential zsRE edits, 6 of 10 unrelated
(NQ) questions score above ε, with the prose corpus or with model-generated questions as the
irrelevant inputs (``benchmarks/wise_routing.py``). 20 sequential edits: 0.95 reliability at 0.84
locality (β 40, γ 25); more irrelevant text keeps locality (0.97) but then edits written later in a
shard lower the scores of earlier ones below ε (reliability 0.41). An earlier per-token variant of
the routing gave 0.63 / 0.94.

**Saved form** (safetensors only): each shard as the flat indices of its mask and D's values there
(exact: a shard never writes outside its mask); the merged memory sparse the same way when at
most half its entries are non-zero (an int32 index and a float32 value: 8 bytes an entry against
4 dense), dense otherwise; the per-edit scores that set ε. ``append=True``
continues the same shard, mask and counters after save → load → Hub download.

Example:
    >>> model.add_edit("wise", request, name="lifelong")                            # doctest: +SKIP
    >>> model.add_edit("wise", another, name="lifelong", append=True)               # doctest: +SKIP
"""
from __future__ import annotations

import inspect
import logging
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch

import editpeft
from editpeft import EditRequest, MethodConfig
from editpeft.adapters import RouterAdapter
from editpeft.arch import get_arch, linear_dims
from editpeft.corpus import CORPORA, corpus_activations
from editpeft.errors import AdapterFormatError
from editpeft.method import check
from editpeft.probe import activations_at, as_btd, output_edit
from editpeft.routing import Prompts, Route, current_session
from editpeft.suffix import BlockSuffix
from editpeft.tokens import TargetBatch, model_device
from editpeft.train import TrainConfig, train_tensors

logger = logging.getLogger(__name__)

#: The reference code's share of the previous merged memory when new shards are merged into it.
MERGED_WEIGHT = 0.6


@dataclass
class WiseConfig(MethodConfig):
    layer: int | None = field(default=None, metadata={
        "help": "block whose FFN output projection gets the side memory (null: 85% of the depth, the "
                "paper's layer 27 of 32 on LLaMA-2-7B)"})
    steps: int = field(default=70, metadata={"help": "SGD steps at most per edit (paper code: n_iter 70)"})
    lr: float = field(default=1.0, metadata={"help": "learning rate (paper code: 1.0 with SGD)"})
    optimizer: str = field(default="sgd", metadata={"help": "sgd (the paper code's), adam or adamw"})
    weight_decay: float = field(default=1e-5, metadata={"help": "SGD weight decay (paper code: 1e-5)"})
    norm_constraint: float = field(default=1.0, metadata={"help": "every entry of W_v' stays within ± this of W_v"})
    stop_loss: float = field(default=0.05, metadata={
        "help": "stop once target NLL + margin loss is below this (margins met, target learned)"})
    mask_ratio: float = field(default=0.2, metadata={"help": "ρ: density of each shard's random gradient mask"})
    alpha: float = field(default=5.0, metadata={"help": "α: irrelevant inputs' activation score stays below it"})
    beta: float = field(default=20.0, metadata={"help": "β: the edit's activation score rises above it"})
    gamma: float = field(default=10.0, metadata={"help": "γ: the edit's score exceeds irrelevant ones by this"})
    act_ratio: float = field(default=0.88, metadata={
        "help": "ε = act_ratio × the smallest score an edit reached (paper code: 0.88)"})
    shard_size: int = field(default=500, metadata={"help": "edits per shard (paper code: save_freq)"})
    merge_every: int = field(default=1000, metadata={"help": "merge the shards every this many edits (merge_freq)"})
    merge_density: float = field(default=0.53, metadata={"help": "TIES: fraction of each shard's entries kept"})
    irrelevant_tokens: int = field(default=256, metadata={"help": "tokens of unrelated text used as x_i"})
    irrelevant_len: int = field(default=16, metadata={
        "help": "the unrelated text is cut into sequences of this many tokens (about a question's length)"})
    corpus: str = field(default="pydoc", metadata={"help": f"text of the irrelevant inputs: one of {CORPORA}"})
    seed: int = field(default=0, metadata={"help": "seed of the shard masks and the corpus sample"})

    def validate(self) -> None:
        check(self.layer is None or self.layer >= 0, f"layer must be a block index or null, got {self.layer}")
        check(self.steps >= 1 and self.lr > 0, "steps must be >= 1 and lr > 0")
        check(self.weight_decay >= 0 and self.norm_constraint > 0, "weight_decay must be >= 0, norm_constraint > 0")
        check(0 < self.mask_ratio <= 1, f"mask_ratio must be in (0, 1], got {self.mask_ratio}")
        check(0 < self.merge_density <= 1, f"merge_density must be in (0, 1], got {self.merge_density}")
        check(0 < self.act_ratio <= 1, f"act_ratio must be in (0, 1], got {self.act_ratio}")
        check(self.alpha >= 0 and self.beta > self.alpha and self.gamma >= 0,
              "the margins need 0 <= alpha < beta and gamma >= 0")
        check(self.shard_size >= 1 and self.merge_every >= self.shard_size,
              "shard_size must be >= 1 and merge_every >= shard_size")
        check(self.irrelevant_len >= 1 and self.irrelevant_tokens >= self.irrelevant_len,
              "irrelevant_len must be >= 1 and irrelevant_tokens >= irrelevant_len")
        check(self.optimizer in ("sgd", "adam", "adamw"), f"optimizer must be sgd, adam or adamw, got {self.optimizer!r}")
        check(self.corpus in CORPORA, f"corpus must be one of {CORPORA}")


@dataclass
class SideMemory:
    """The edited side memory of one projection, as deltas D = W_v' − W_v (shape (d_out, d_in)).

    ``shards``: (mask indices, delta) of each shard not merged yet, the last one the open shard;
    ``merged``: the merged memory's delta or None; ``edit_scores``: each edit's smallest activation
    score when it was made; ``edits_in_shard`` and ``merges`` count the lifelong state.
    """

    dims: tuple[int, int]
    shards: list[tuple[torch.Tensor, torch.Tensor]]
    merged: torch.Tensor | None
    edit_scores: torch.Tensor
    edits_in_shard: int = 0
    merges: int = 0

    @classmethod
    def empty(cls, d_out: int, d_in: int) -> "SideMemory":
        return cls((d_out, d_in), [], None, torch.zeros(0))

    def deltas(self) -> list[torch.Tensor]:
        """Every memory to route among: the merged one first, then the shards."""
        return ([self.merged] if self.merged is not None else []) + [d for _, d in self.shards]

    def threshold(self, act_ratio: float) -> float:
        """ε: ``act_ratio`` × the smallest score an edit reached (infinite before any edit)."""
        return act_ratio * float(self.edit_scores.min()) if len(self.edit_scores) else float("inf")

    def num_edits(self) -> int:
        return len(self.edit_scores)


def activation_scores(acts: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """Δ_act per token: ‖a · Dᵀ‖₂ (Eq. 3), for acts (..., d_in) and delta (d_out, d_in)."""
    return (acts @ delta.T.to(acts)).norm(dim=-1)


def sequence_scores(acts: torch.Tensor, mask: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """Δ_act of whole sequences: the mean of the per-token scores over each row's real tokens, for
    acts (batch, seq, d_in) and mask (batch, seq) (1 for a real token, 0 for padding)."""
    keep = mask.to(acts.dtype)
    return (activation_scores(acts, delta) * keep).sum(-1) / keep.sum(-1).clamp_min(1)


def prefix_scores(acts: torch.Tensor, delta: torch.Tensor, shortest: int = 2) -> torch.Tensor:
    """Sequence scores of every prefix of at least ``shortest`` tokens of each row of acts
    (batch, seq, d_in), flattened: unrelated text stands for prompts of every length."""
    scores = activation_scores(acts, delta).cumsum(-1)
    lengths = torch.arange(1, acts.shape[1] + 1, device=scores.device, dtype=scores.dtype)
    return (scores / lengths)[:, shortest - 1:].flatten()


def choose_memories(acts: torch.Tensor, mask: torch.Tensor, deltas: Sequence[torch.Tensor],
                    threshold: float) -> list[int | None]:
    """Routing (Eq. 4) per row: the index of the memory whose sequence score is highest, where that
    score reaches ``threshold``; None (the main memory) elsewhere."""
    scores = torch.stack([sequence_scores(acts, mask, d) for d in deltas])     # (memories, batch)
    best, which = scores.max(dim=0)
    return [int(k) if float(b) >= threshold else None for b, k in zip(best, which)]


def ties_merge(deltas: Sequence[torch.Tensor], weights: Sequence[float], density: float) -> torch.Tensor:
    """TIES-merging (Yadav et al., NeurIPS 2023): trim each delta to its ``density`` largest
    magnitudes, elect each entry's sign from the weighted sum, and take the weighted mean of the
    entries that agree with it."""
    trimmed = []
    for d in deltas:
        k = max(1, int(round(density * d.numel())))
        cut = d.abs().flatten().kthvalue(d.numel() - k + 1).values if k < d.numel() else d.abs().min() - 1
        trimmed.append(torch.where(d.abs() >= cut, d, torch.zeros_like(d)))
    stack = torch.stack(trimmed)
    w = torch.tensor(list(weights), dtype=stack.dtype).view(-1, *[1] * (stack.ndim - 1))
    sign = torch.sign((w * stack).sum(0))
    agree = (torch.sign(stack) == sign) & (stack != 0)
    total = (w * agree).sum(0)
    return torch.where(total > 0, (w * stack * agree).sum(0) / total.clamp_min(1e-12), torch.zeros_like(sign))


class WiseAdapter(RouterAdapter):
    """A side memory at one FFN output projection, routed once per sequence by its activation score."""

    def __init__(self, memory: SideMemory, act_ratio: float, **common: Any):
        super().__init__(**common)
        self.memory = memory
        self.act_ratio = act_ratio
        self._live: tuple[torch.device, torch.dtype, list[torch.Tensor]] | None = None

    def __len__(self) -> int:
        return self.memory.num_edits()

    def _deltas(self, like: torch.Tensor) -> list[torch.Tensor]:
        """The memories' deltas on ``like``'s device and dtype (converted once, then reused)."""
        live = self._live
        if live is None or live[0] != like.device or live[1] != like.dtype:
            live = self._live = (like.device, like.dtype, [d.to(like) for d in self.memory.deltas()])
        return live[2]

    def decide(self, model, prompts: Prompts) -> list[Route | None]:
        """Eq. 4 for each row from its prompt: the side memory (``entry``: which one) when the
        prompt's mean activation score reaches ε, the main memory (None) otherwise."""
        if not self.memory.num_edits():
            return [None] * len(prompts)
        module = model.get_submodule(self.targets[0])
        ids, mask = prompts.input_ids, prompts.attention_mask
        acts = as_btd(activations_at(model, module, _row_inputs(model, ids, mask)), ids)
        which = choose_memories(acts, mask.to(acts.device), self._deltas(acts), self.memory.threshold(self.act_ratio))
        return [None if k is None else Route(entry=k) for k in which]

    def route(self, model, inputs: dict[str, Any], call_next):
        """Adds the chosen memory's change ``a(x)·Dᵀ`` to the projection's output on every token of
        the rows in scope (prompt and generated tokens alike); other rows run the main memory."""
        session = current_session(model)
        routes = session.routes(self) if session is not None else []
        chosen = [None if r is None else r.entry for r in routes]
        ids = inputs.get("input_ids")
        if ids is None or not any(k is not None for k in chosen):
            return call_next(inputs)
        batch, seq = ids.shape

        def add(x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
            if x.shape[:-1].numel() != batch * seq:
                return out                 # another router's rewritten rows: this memory does not serve them
            acts = x.reshape(batch, seq, x.shape[-1])
            deltas = self._deltas(x)
            change = torch.zeros(batch, seq, out.shape[-1], dtype=out.dtype, device=out.device)
            for k in set(c for c in chosen if c is not None):
                rows = torch.tensor([i for i, c in enumerate(chosen) if c == k], device=x.device)
                change[rows] = (acts[rows] @ deltas[k].T).to(out.dtype)
            return out + change.view_as(out)

        with output_edit(model.get_submodule(self.targets[0]), add):
            return call_next(inputs)

    def attach(self, state) -> None:
        d_in, d_out = linear_dims(state.module(self.targets[0]))
        if (d_out, d_in) != self.memory.dims:
            raise AdapterFormatError(f"the WISE side memory is {self.memory.dims[1]}->{self.memory.dims[0]} but "
                                     f"{self.targets[0]!r} is {d_in}->{d_out}: this adapter was made for another model")
        self._live = None
        super().attach(state)

    # -- saved form --------------------------------------------------------------------------
    def state_dict(self) -> dict[str, torch.Tensor]:
        m = self.memory
        out = {**super().state_dict(), "edit_scores": m.edit_scores.float().contiguous()}
        for i, (index, delta) in enumerate(m.shards):
            out[f"shard.{i}.index"] = index.to(torch.int32).contiguous()
            out[f"shard.{i}.values"] = delta.flatten()[index].float().contiguous()
        if m.merged is not None:
            index = torch.nonzero(m.merged.flatten()).flatten()
            if 2 * len(index) <= m.merged.numel():          # 8 bytes per stored entry against 4 per dense one
                out["merged.index"] = index.to(torch.int32).contiguous()
                out["merged.values"] = m.merged.flatten()[index].float().contiguous()
            else:
                out["merged.dense"] = m.merged.float().contiguous()
        return out

    def extra_config(self) -> dict[str, Any]:
        m = self.memory
        return {"dims": list(m.dims), "shards": len(m.shards), "edits_in_shard": m.edits_in_shard,
                "merges": m.merges, "act_ratio": self.act_ratio}

    @classmethod
    def from_saved(cls, tensors, extra, **common) -> "WiseAdapter":
        try:
            dims, n_shards, in_shard, merges, act_ratio = (extra[k] for k in (
                "dims", "shards", "edits_in_shard", "merges", "act_ratio"))
        except (KeyError, TypeError) as e:
            raise AdapterFormatError(f"a WISE adapter config needs extra.dims/shards/edits_in_shard/merges/"
                                     f"act_ratio: {e}") from None
        whole = lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 0   # noqa: E731
        if not (isinstance(dims, list) and len(dims) == 2 and all(whole(x) and x > 0 for x in dims)
                and whole(n_shards) and whole(in_shard) and whole(merges)
                and isinstance(act_ratio, float) and 0 < act_ratio <= 1):
            raise AdapterFormatError(f"bad WISE extra config {extra!r}: dims are two positive ints, shards, "
                                     "edits_in_shard and merges ints >= 0, act_ratio a float in (0, 1]")
        d_out, d_in = dims
        if len(common.get("targets") or []) != 1:
            raise AdapterFormatError(f"a WISE adapter has exactly one target module; got {common.get('targets')}")
        _check_counts(common.get("hparams") or {}, len(common.get("requests") or []), n_shards, in_shard, merges)
        numel = d_out * d_in

        def sparse(prefix: str) -> torch.Tensor:
            index, values = tensors.get(f"{prefix}.index"), tensors.get(f"{prefix}.values")
            if index is None or values is None:
                raise AdapterFormatError(f"WISE tensors {prefix}.index/{prefix}.values are missing")
            if index.dtype != torch.int32 or index.ndim != 1 or values.shape != index.shape \
                    or not values.is_floating_point():
                raise AdapterFormatError(f"WISE {prefix}: int32 indices and float values of one length expected")
            if len(index) and (int(index.min()) < 0 or int(index.max()) >= numel
                               or len(torch.unique(index)) != len(index)):
                raise AdapterFormatError(f"WISE {prefix}.index holds indices outside 0..{numel - 1} or repeats")
            return index.long()

        shards = []
        for i in range(n_shards):
            index = sparse(f"shard.{i}")
            delta = torch.zeros(numel)
            delta[index] = tensors[f"shard.{i}.values"].float()
            shards.append((index, delta.view(d_out, d_in)))
        merged = None
        if "merged.dense" in tensors:
            merged = tensors["merged.dense"].float()
            if merged.shape != (d_out, d_in):
                raise AdapterFormatError(f"WISE merged.dense must be {(d_out, d_in)}, got {tuple(merged.shape)}")
        elif "merged.index" in tensors:
            index = sparse("merged")
            merged = torch.zeros(numel)
            merged[index] = tensors["merged.values"].float()
            merged = merged.view(d_out, d_in)
        scores = tensors.get("edit_scores")
        if scores is None or scores.ndim != 1 or not scores.is_floating_point() or bool((scores < 0).any()):
            raise AdapterFormatError("WISE edit_scores must be a 1-D float tensor of scores >= 0")
        if len(scores) != len(common.get("requests") or []):
            raise AdapterFormatError(f"WISE holds {len(scores)} edit scores for {len(common.get('requests') or [])} "
                                     "requests")
        memory = SideMemory((d_out, d_in), shards, merged, scores.float(), in_shard, merges)
        return cls(memory, act_ratio, **common)


def _row_inputs(model, ids: torch.Tensor, mask: torch.Tensor) -> dict[str, torch.Tensor]:
    """Forward inputs for ``ids`` in which every row has the positions it would have alone (from the
    attention mask, as ``generate`` builds them), so a prompt's score does not depend on its padding."""
    inputs = {"input_ids": ids, "attention_mask": mask}
    if not bool(mask.all()) and "position_ids" in inspect.signature(model.forward).parameters:
        inputs["position_ids"] = (mask.long().cumsum(-1) - 1).clamp_min(0)
    return inputs


def _check_counts(hparams: dict, n_edits: int, n_shards: int, in_shard: int, merges: int) -> None:
    """The lifelong counters must add up: every merge took ``merge_every`` edits, every closed shard
    ``shard_size``, the open shard ``edits_in_shard`` (1..shard_size)."""
    shard_size, merge_every = hparams.get("shard_size"), hparams.get("merge_every")
    if not (isinstance(shard_size, int) and isinstance(merge_every, int) and shard_size >= 1):
        raise AdapterFormatError("WISE hparams need integer shard_size and merge_every")
    expected = merges * merge_every + (max(n_shards - 1, 0) * shard_size + in_shard if n_shards else 0)
    if (n_shards and not 1 <= in_shard <= shard_size) or (not n_shards and in_shard) or expected != n_edits:
        raise AdapterFormatError(f"WISE counters do not add up: {merges} merges of {merge_every}, {n_shards} shards "
                                 f"of {shard_size} with {in_shard} in the open one, for {n_edits} edits")


def _layer(model, config: WiseConfig) -> int:
    arch = get_arch(model)
    return arch.check_layer(config.layer) if config.layer is not None else int(0.85 * (arch.num_layers - 1))


class Wise(editpeft.EditMethod):
    name = "wise"
    kind = "router"
    Config = WiseConfig
    adapter_class = WiseAdapter

    def targets(self, model, config: WiseConfig) -> list[str]:
        return [get_arch(model).mlp_out_name(_layer(model, config))]

    def compute(self, model, tokenizer, requests: Sequence[EditRequest], config: WiseConfig) -> WiseAdapter:
        (target,) = self.targets(model, config)
        d_in, d_out = linear_dims(model.get_submodule(target))
        empty = WiseAdapter(SideMemory.empty(d_out, d_in), config.act_ratio, method=self.name,
                            hparams=config.to_dict(), requests=[], targets=[target])
        return self._edit(empty, model, tokenizer, requests, config)

    def extend(self, adapter: WiseAdapter, model, tokenizer, requests: Sequence[EditRequest],
               config: WiseConfig) -> WiseAdapter:
        with adapter.switched_off():     # the new memory replaces this one; it is trained without it
            return self._edit(adapter, model, tokenizer, requests, config)

    def _edit(self, adapter: WiseAdapter, model, tokenizer, requests: Sequence[EditRequest],
              config: WiseConfig) -> WiseAdapter:
        target = adapter.targets[0]
        module = model.get_submodule(target)
        irrelevant = getattr(adapter, IRRELEVANT_ATTR, None)
        if irrelevant is None:
            irrelevant = _irrelevant_acts(model, tokenizer, module, config)
        m = adapter.memory
        memory = SideMemory(m.dims, [(i, d.clone()) for i, d in m.shards], m.merged, m.edit_scores.clone(),
                            m.edits_in_shard, m.merges)
        layer = get_arch(model).layer_of(target)
        for request in requests:
            if not memory.shards or memory.edits_in_shard >= config.shard_size:
                memory.shards.append((_shard_mask(memory, config), torch.zeros(memory.dims)))
                memory.edits_in_shard = 0
            index, delta = memory.shards[-1]
            delta, score = _train_edit(model, tokenizer, module, layer, request, index, delta, irrelevant, config)
            memory.shards[-1] = (index, delta)
            memory.edit_scores = torch.cat([memory.edit_scores, torch.tensor([score])])
            memory.edits_in_shard += 1
            if memory.num_edits() % config.merge_every == 0:
                _merge(memory, config)
        out = WiseAdapter(memory, config.act_ratio, method=self.name, hparams=config.to_dict(),
                          requests=[*adapter.requests, *requests], targets=[target])
        setattr(out, IRRELEVANT_ATTR, irrelevant)
        return out


#: Attribute of an adapter holding the irrelevant inputs' activations in this process (not saved).
IRRELEVANT_ATTR = "_wise_irrelevant"


def _shard_mask(memory: SideMemory, config: WiseConfig) -> torch.Tensor:
    """Flat indices of a new shard's random mask (density ρ), seeded by the shard's number so a
    reloaded adapter draws the same masks."""
    numel = memory.dims[0] * memory.dims[1]
    number = memory.merges * (config.merge_every // config.shard_size + 1) + len(memory.shards)
    g = torch.Generator().manual_seed(config.seed * 100_003 + number)
    return torch.nonzero(torch.rand(numel, generator=g) < config.mask_ratio).flatten()


def _merge(memory: SideMemory, config: WiseConfig) -> None:
    """TIES-merge the shards (and the previous merged memory) into the merged memory (§2.3)."""
    shards = [d for _, d in memory.shards]
    if memory.merged is None:
        deltas, weights = shards, [1.0 / len(shards)] * len(shards)
    else:
        deltas = shards + [memory.merged]
        weights = [(1 - MERGED_WEIGHT) / len(shards)] * len(shards) + [MERGED_WEIGHT]
    memory.merged = ties_merge(deltas, weights, config.merge_density)
    memory.shards, memory.edits_in_shard, memory.merges = [], 0, memory.merges + 1


def _irrelevant_acts(model, tokenizer, module, config: WiseConfig) -> torch.Tensor:
    """The projection's inputs on unrelated text (the x_i): ``irrelevant_tokens`` tokens of the corpus
    cut into sequences of ``irrelevant_len`` tokens, shape (sequences, irrelevant_len, d_in)."""
    n = max(1, config.irrelevant_tokens // config.irrelevant_len) * config.irrelevant_len
    acts = corpus_activations(model, tokenizer, module, config.corpus, n, seq_len=config.irrelevant_len,
                              seed=config.seed)
    return acts.reshape(-1, config.irrelevant_len, acts.shape[-1])


def _hinge_mean(x: torch.Tensor) -> torch.Tensor:
    """Mean of the positive entries (0 when none): the reference code's hinge averaging."""
    pos = x[x > 0]
    return pos.mean() if pos.numel() else x.new_zeros(())


def _train_edit(model, tokenizer, module, layer: int, request: EditRequest, index: torch.Tensor,
                delta: torch.Tensor, irrelevant: torch.Tensor, config: WiseConfig) -> tuple[torch.Tensor, float]:
    """Train the open shard's delta on one edit (Eq. 5); returns it and the edit's smallest score.

    The edit's inputs x_e are its prompt alone (what ``generate`` routes on) and the prompt with the
    target teacher-forced (what a scoring forward routes on); the side memory is applied on every
    token of the row, as routing applies it to a row in scope."""
    device = model_device(model)
    batch = TargetBatch.for_model(model, tokenizer, [request.prompt], [request.target_new], device=device)
    positions = batch.target_positions(0)
    where = torch.stack([torch.zeros_like(positions), positions], 1).to(device)
    ids = batch.input_ids
    real = (batch.attention_mask if batch.attention_mask is not None else torch.ones_like(ids))[0].bool()
    acts = as_btd(activations_at(model, module, batch.model_inputs()), ids)[0].float()     # (seq, d_in)
    prompt_only = real & (torch.arange(ids.shape[1], device=real.device) <= int(positions[0]))
    scopes = torch.stack([prompt_only, real]).to(acts.device)                              # x_e: two views
    suffix = BlockSuffix.capture(model, layer, batch.model_inputs(), where)
    mask = torch.zeros(delta.numel(), device=device)
    mask[index.to(device)] = 1.0
    mask = mask.view_as(delta)
    irrelevant = irrelevant.to(device)

    def side(d: torch.Tensor):
        return lambda x, out: out + (x @ d.T.to(x)).to(out.dtype)

    def edit_scores(d: torch.Tensor) -> torch.Tensor:
        return sequence_scores(acts[None].expand(2, -1, -1), scopes, d)

    def loss(p: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        d = p["delta"]
        with output_edit(module, side(d)):
            if suffix is not None:
                logits = suffix.logits(where)[None]
            else:
                logits = model(**batch.model_inputs(), use_cache=False).logits[:, positions]
        nll = batch.target_nll(logits, kept=positions.tolist())
        s_e, s_i = edit_scores(d), prefix_scores(irrelevant, d)
        margin = (_hinge_mean(s_i - config.alpha) + _hinge_mean(config.beta - s_e)
                  + _hinge_mean(s_i[:, None] - s_e[None, :] + config.gamma))
        if logger.isEnabledFor(logging.DEBUG):
            logger.debug("wise step: nll %.4f margin %.4f edit %.2f irrelevant max %.2f", float(nll), float(margin),
                         float(s_e.min()), float(s_i.max()))
        return {"target": nll + margin}

    bound = config.norm_constraint
    result = train_tensors({"delta": delta.to(device)}, loss,
                           TrainConfig(steps=config.steps, lr=config.lr, optimizer=config.optimizer,
                                       weight_decay=config.weight_decay, stop_loss=config.stop_loss,
                                       desc="wise"),
                           grad_masks={"delta": mask}, constraint=lambda p: p["delta"].clamp_(-bound, bound))
    trained = result.params["delta"].float()
    with torch.no_grad():
        score = float(edit_scores(trained).min())
        unrelated = float(prefix_scores(irrelevant, trained).max())
    logger.info("wise %r: %d steps, loss %.4f, edit score %.2f, irrelevant max %.2f", request.prompt, result.steps,
                result.loss, score, unrelated)
    return trained.cpu(), score
