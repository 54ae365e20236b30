"""MELO — LoRA blocks selected per input by a vector index of a layer's activations.

Yu, Chen, Zhou, He. "MELO: Enhancing Model Editing with Neuron-Indexed Dynamic LoRA", AAAI 2024
(arXiv:2312.11795).

**Dynamic LoRA** (§3.2). Each target module W₀ gets a LoRA of total rank R = N·r whose rank is
cut into N blocks of r (``num_blocks``, ``rank_per_block``): A = [A₁; …; A_N] (A_j ∈ R^{r×d_in}),
B = [B₁ … B_N] (B_j ∈ R^{d_out×r}). An input x routed to block j gets only that block:

    h = W₀ x + s · B_j A_j x,        s = α / r                                   (block LoRA)

and an input routed to no block gets ``h = W₀ x`` — the base model's output, bitwise. A new block
starts as peft's LoRA does (A_j Kaiming-uniform, B_j = 0). The reference code puts the blocks on the
FFN of the two blocks after the key layer (``lora_layers``); here the FFN output projection by
default (``target_modules`` names others, matched as peft matches them). The key layer's own FFN
output projection may hold blocks too (it reads the key as its input, then adds its block): on
families whose FFN output passes a post-FFN norm (Gemma 2/3) a later block alone is bounded.

**Vector database** (§3.3, "neuron index"). The key of a token is the FFN neurons' activation at
the key layer l (the input of its FFN output projection), k = a^l(x). The database holds entries
(k_i, ρ_i, j_i): a key, a radius and the block it indexes. Lookup (inference and training alike):

    i* = argmin_i ‖k − k_i‖₂,     block(k) = j_{i*}  if ‖k − k_{i*}‖₂ ≤ ρ_{i*},  none otherwise

An edit (x_e, y_e) with key k_e (the prompt's last token, the paper's ``key_id = -1``):

- if block(k_e) = j, the edit joins cluster j: block j is trained further, on the new edit and
  (``replay``) on the earlier edits of cluster j, which the adapter stores;
- otherwise a new cluster opens with a fresh block j = (number of blocks so far);

and its keys enter the database with radius ρ_init (``init_radius``). The block is trained by Adam
on the teacher-forced NLL of the targets, −1/|y| Σ_t log p(y_t | x, y_<t), for ``steps`` steps with the
database in place; the base model and every other block stay fixed.

Choices where the paper leaves the detail open, and why:

- **Per-token routing.** Every token position looks itself up; a target of m tokens enters the
  database as the m keys at the positions that predict each target token (for m = 1 exactly the
  paper's last-token key). The reference code decides once per batch from one row's key; a
  per-token decision gives each row of a batch its own block, needs no state across the steps of
  ``generate`` (a KV cache only adds new tokens to look up) and does not depend on padding.
- **Cluster membership** is decided by the last prompt token's key; a conflicting label does not
  split radii (the reference code opens a new cluster then as well): the nearest entry wins, and an
  edit's own keys sit at distance 0 from its entries.
- The reference code halves the learning rate every 20 steps (StepLR) and runs all ``num_iter``
  steps; here the shared loop's constant rate with an early stop below ``stop_loss``.
- ``init_radius`` is in the key's units, which depend on the model and layer (the paper's 75 on T5,
  0.5 on GPT2-XL): measure the distances of paraphrases and of unrelated prompts to edit keys and
  pick a radius between them (``cards/melo/llama.yaml`` records such a measurement).
- A batch of requests is edited one request after another (the paper trains one block per batch).
- ``alpha`` default 40 (s = 20 with r = 2) is the reference zsRE setting's effective block scale
  (there α = R and each factor's block is scaled by √(R/r), i.e. s = N = 20).

**Saved form** (safetensors + JSON): the database (``index.keys``, ``index.radii``,
``index.blocks``), each target's factors ``<module>.lora_A`` (N·r × d_in) and ``<module>.lora_B``
(d_out × N·r) for the N blocks opened so far, and the block of every request (for replay), all
validated on load. ``append=True`` continues the same database and blocks.

Example:
    >>> model.add_edit("melo", request, name="lifelong")                            # doctest: +SKIP
    >>> model.add_edit("melo", another, name="lifelong", append=True)               # doctest: +SKIP
"""
from __future__ import annotations

import logging
from contextlib import ExitStack
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch

import editpeft
from editpeft import EditRequest, MethodConfig
from editpeft.adapters import ModuleHookAdapter
from editpeft.arch import get_arch, linear_dims
from editpeft.errors import AdapterFormatError, ConfigError, EditError
from editpeft.finetune import LoraChange, match_modules
from editpeft.method import check
from editpeft.probe import activations_at, output_edit
from editpeft.suffix import BlockSuffix
from editpeft.tokens import TargetBatch, model_device, seeded_rng
from editpeft.train import TrainConfig, train_tensors

logger = logging.getLogger(__name__)

#: Block id of a token that falls in no radius (the base model's output).
NO_BLOCK = -1


@dataclass
class MeloConfig(MethodConfig):
    key_layer: int | None = field(default=None, metadata={
        "help": "block whose FFN activation (input of its output projection) is the key (null: 70% of "
                "the depth; the reference code keys GPT2-XL at block 35 of 48)"})
    lora_layers: list | None = field(default=None, metadata={
        "help": "blocks that get the LoRA blocks: key_layer (its FFN output projection only, which reads the "
                "key) or later ones (null: the two after it, as the reference code)"})
    target_modules: list | None = field(default=None, metadata={
        "help": "module names in those blocks (as peft matches them), e.g. [up_proj, down_proj]; null: "
                "the FFN output projection"})
    rank_per_block: int = field(default=2, metadata={"help": "r: rank of one cluster's block (paper: 2)"})
    num_blocks: int = field(default=20, metadata={
        "help": "N: most blocks (clusters) the adapter may open; total rank N·r (paper zsRE: 20)"})
    alpha: float = field(default=40.0, metadata={"help": "a block's change is scaled by alpha / rank_per_block"})
    init_radius: float = field(default=75.0, metadata={
        "help": "ρ_init: radius of a new key, in the key's own units (paper: 75 on T5 zsRE, 0.5 on GPT2-XL)"})
    steps: int = field(default=50, metadata={"help": "Adam steps at most per edit (paper: num_iter 50)"})
    lr: float = field(default=1e-2, metadata={"help": "Adam learning rate (paper zsRE: edit_lr 1e-2)"})
    stop_loss: float | None = field(default=1e-2, metadata={"help": "stop once the target NLL is below this"})
    replay: bool = field(default=True, metadata={"help": "train a joined cluster's earlier edits again with the new one"})
    max_replay: int | None = field(default=None, metadata={
        "help": "replay at most this many of the cluster's earlier edits, the most recent (null: all; bounds the "
                "cost of an edit that joins a large cluster)"})
    seed: int = field(default=0, metadata={"help": "seed of the new blocks' initialisation"})

    layer_fields = ("key_layer", "lora_layers")

    def validate(self) -> None:
        check(self.key_layer is None or self.key_layer >= 0, f"key_layer must be a block index or null, got {self.key_layer}")
        check(self.lora_layers is None or (isinstance(self.lora_layers, list) and self.lora_layers and all(
            isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in self.lora_layers)),
            f"lora_layers must be null or a non-empty list of block indices, got {self.lora_layers!r}")
        check(self.target_modules is None or (isinstance(self.target_modules, list) and self.target_modules
                                              and all(isinstance(m, str) and m for m in self.target_modules)),
              f"target_modules must be null or a non-empty list of module names, got {self.target_modules!r}")
        check(self.rank_per_block >= 1, f"rank_per_block must be >= 1, got {self.rank_per_block}")
        check(self.num_blocks >= 1, f"num_blocks must be >= 1, got {self.num_blocks}")
        check(self.alpha > 0, f"alpha must be > 0, got {self.alpha}")
        check(self.init_radius > 0, f"init_radius must be > 0, got {self.init_radius}")
        check(self.steps >= 1 and self.lr > 0, f"steps must be >= 1 and lr > 0, got {self.steps}, {self.lr}")
        check(self.stop_loss is None or self.stop_loss > 0, f"stop_loss must be > 0 or null, got {self.stop_loss}")
        check(self.max_replay is None or self.max_replay >= 0, f"max_replay must be >= 0 or null, got {self.max_replay}")

    @property
    def scale(self) -> float:
        return LoraChange.scaling(self.rank_per_block, self.alpha)


# -- the vector database ---------------------------------------------------------------------------
@dataclass(frozen=True)
class BlockIndex:
    """Entries (key, radius, block): ``keys`` (E, d) float32, ``radii`` (E,), ``blocks`` (E,) int64."""

    keys: torch.Tensor
    radii: torch.Tensor
    blocks: torch.Tensor

    @classmethod
    def empty(cls, dim: int) -> "BlockIndex":
        return cls(torch.zeros(0, dim), torch.zeros(0), torch.zeros(0, dtype=torch.long))

    @classmethod
    def checked(cls, keys: torch.Tensor, radii: torch.Tensor, blocks: torch.Tensor, num_blocks: int) -> "BlockIndex":
        """An index from stored tensors; ValueError unless keys (E, d) and radii (E,) are finite
        floats, radii >= 0, and blocks (E,) integers in 0..num_blocks-1."""
        shapes = ", ".join(f"{n} {tuple(t.shape)} {str(t.dtype).replace('torch.', '')}"
                           for n, t in (("keys", keys), ("radii", radii), ("blocks", blocks)))
        if keys.ndim != 2 or radii.ndim != 1 or blocks.ndim != 1 or not keys.shape[0] == radii.shape[0] == blocks.shape[0]:
            raise ValueError(f"the index needs keys (E, d), radii (E,) and blocks (E,); got {shapes}")
        if not (keys.is_floating_point() and radii.is_floating_point()) or blocks.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"index keys and radii must be floats and blocks integers; got {shapes}")
        if not (bool(torch.isfinite(keys).all()) and bool(torch.isfinite(radii).all())) or bool((radii < 0).any()):
            raise ValueError("index keys and radii must be finite and radii >= 0")
        if len(blocks) and (int(blocks.min()) < 0 or int(blocks.max()) >= num_blocks):
            raise ValueError(f"index block ids must lie in 0..{num_blocks - 1} (the blocks stored)")
        return cls(keys.float(), radii.float(), blocks.long())

    def __len__(self) -> int:
        return self.keys.shape[0]

    def to(self, device) -> "BlockIndex":
        return BlockIndex(self.keys.to(device), self.radii.to(device), self.blocks.to(device))

    def lookup(self, queries: torch.Tensor) -> torch.Tensor:
        """Block id of each query row (E, d) -> (Q,): the nearest entry's block when the query lies
        within its radius, :data:`NO_BLOCK` otherwise."""
        if not len(self):
            return torch.full((queries.shape[0],), NO_BLOCK, dtype=torch.long, device=queries.device)
        # exact differences, not the |q|²+|k|²-2qk expansion: a key must be at distance 0 from itself
        dist = torch.cdist(queries.float(), self.keys, compute_mode="donot_use_mm_for_euclid_dist")
        d, i = dist.min(-1)
        return torch.where(d <= self.radii[i], self.blocks[i], torch.full_like(i, NO_BLOCK))

    def add(self, keys: torch.Tensor, radius: float, block: int) -> "BlockIndex":
        keys = keys.detach().float().cpu()
        n = keys.shape[0]
        return BlockIndex(torch.cat([self.keys, keys]), torch.cat([self.radii, torch.full((n,), float(radius))]),
                          torch.cat([self.blocks, torch.full((n,), block, dtype=torch.long)]))


def routed_lora(x: torch.Tensor, out: torch.Tensor, route: torch.Tensor, a: torch.Tensor, b: torch.Tensor,
                rank: int, scale: float) -> torch.Tensor:
    """``out`` plus, at each token whose ``route`` is a block j, ``scale · B_j A_j x``; tokens routed
    nowhere keep ``out`` bitwise. ``x`` (..., d_in) and ``out`` (..., d_out) hold one token per
    entry of ``route`` (flattened); ``a`` (N·r, d_in), ``b`` (d_out, N·r)."""
    flat_x = x.reshape(-1, x.shape[-1])
    if route.shape[0] != flat_x.shape[0]:
        raise EditError(f"MELO routed {route.shape[0]} tokens at its key layer but this module sees "
                        f"{flat_x.shape[0]}: its LoRA layers must run in the same forward as its key layer")
    idx = torch.nonzero(route >= 0).flatten()
    if not idx.numel():
        return out
    blocks = route[idx]
    a_sel = a.view(-1, rank, a.shape[-1])[blocks]                        # (n, r, d_in)
    b_sel = b.view(b.shape[0], -1, rank).permute(1, 0, 2)[blocks]        # (n, d_out, r)
    h = torch.einsum("nd,nrd->nr", flat_x[idx].to(a.dtype), a_sel)
    delta = torch.einsum("nr,nor->no", h, b_sel) * scale
    flat_out = out.reshape(-1, out.shape[-1])
    return flat_out.index_add(0, idx, delta.to(out.dtype)).view_as(out)


# -- the adapter --------------------------------------------------------------------------------------
class MeloAdapter(ModuleHookAdapter):
    """The database at the key module (``targets[0]``) and block LoRAs on the modules of ``factors``:
    ``targets[1:]``, and the key module itself when it holds blocks too (it reads the key first)."""

    def __init__(self, index: BlockIndex, factors: dict[str, tuple[torch.Tensor, torch.Tensor]],
                 request_blocks: list[int], rank: int, scale: float, **common: Any):
        super().__init__(**common)
        self.index, self.factors, self.request_blocks = index, dict(factors), list(request_blocks)
        self.rank, self.scale = int(rank), float(scale)
        self._route: torch.Tensor | None = None
        self._live: tuple | None = None

    @property
    def num_blocks(self) -> int:
        a, _ = next(iter(self.factors.values()))
        return a.shape[0] // self.rank

    def __len__(self) -> int:
        return len(self.requests)

    # -- attachment ---------------------------------------------------------------------------
    def hooks(self):
        return [(self.targets[0], "output", self._route_tokens)] + [(t, "output", self._lora_hook(t)) for t in self.factors]

    def _ensure_live(self, device: torch.device, dtype: torch.dtype) -> tuple:
        live = self._live
        if live is None or live[0] != device or live[1] != dtype:
            live = self._live = (device, dtype, self.index.to(device),
                                 {t: (a.to(device, dtype), b.to(device, dtype)) for t, (a, b) in self.factors.items()})
        return live

    def _route_tokens(self, args: tuple, output: torch.Tensor) -> torch.Tensor:
        x = args[0]
        index = self._ensure_live(x.device, x.dtype)[2]
        self._route = index.lookup(x.reshape(-1, x.shape[-1]))
        return output

    def _lora_hook(self, target: str):
        def contribution(args: tuple, output: torch.Tensor) -> torch.Tensor:
            x = args[0]
            if self._route is None:
                raise EditError("MELO's LoRA layer ran before its key layer in this forward")
            a, b = self._ensure_live(x.device, x.dtype)[3][target]
            return routed_lora(x, output, self._route.to(x.device), a, b, self.rank, self.scale)
        return contribution

    def prepare(self, state) -> None:
        key = self.targets[0]
        d_key, _ = linear_dims(state.module(key))
        if self.index.keys.shape[1] != d_key:
            raise AdapterFormatError(f"the MELO keys are {self.index.keys.shape[1]}-dim but {key!r} reads "
                                     f"{d_key}: this adapter was made for another model")
        expected = _lora_modules(state.model, MeloConfig.from_dict(self.hparams))
        if list(self.factors) != expected:
            raise AdapterFormatError(f"the MELO factors are for {list(self.factors)} but its hparams put the blocks on "
                                     f"{expected}")
        for t in self.factors:
            d_in, d_out = linear_dims(state.module(t))
            a, b = self.factors[t]
            if a.shape[1] != d_in or b.shape[0] != d_out:
                raise AdapterFormatError(f"the MELO factors of {t!r} are {a.shape[1]}->{b.shape[0]} but the module "
                                         f"is {d_in}->{d_out}: this adapter was made for another model")
        self._live, self._route = None, None

    # -- saved form ---------------------------------------------------------------------------
    def state_dict(self) -> dict[str, torch.Tensor]:
        out = {"index.keys": self.index.keys.contiguous(), "index.radii": self.index.radii.contiguous(),
               "index.blocks": self.index.blocks.contiguous()}
        for t, (a, b) in self.factors.items():
            out[f"{t}.lora_A"], out[f"{t}.lora_B"] = a.contiguous(), b.contiguous()
        return out

    def extra_config(self) -> dict[str, Any]:
        return {"request_blocks": list(self.request_blocks)}

    @classmethod
    def from_saved(cls, tensors, extra, **common) -> "MeloAdapter":
        try:
            config = MeloConfig.from_dict(common.get("hparams") or {})
        except ConfigError as e:
            raise AdapterFormatError(f"the MELO hparams are invalid: {e}") from None
        targets = common.get("targets") or []
        if len(targets) < 2:
            raise AdapterFormatError(f"a MELO adapter has a key module and at least one LoRA module; got {targets}")
        r = config.rank_per_block
        factors, n_blocks = {}, None
        key_has_blocks = f"{targets[0]}.lora_A" in tensors or f"{targets[0]}.lora_B" in tensors
        for t in ([targets[0]] if key_has_blocks else []) + targets[1:]:
            a, b = tensors.get(f"{t}.lora_A"), tensors.get(f"{t}.lora_B")
            if a is None or b is None:
                raise AdapterFormatError(f"MELO tensors {t}.lora_A/{t}.lora_B are missing from the adapter file")
            ok = (a.ndim == b.ndim == 2 and a.is_floating_point() and b.is_floating_point() and a.shape[0] == b.shape[1]
                  and a.shape[0] % r == 0 and bool(torch.isfinite(a).all()) and bool(torch.isfinite(b).all()))
            if not ok or (n_blocks is not None and a.shape[0] != n_blocks * r):
                raise AdapterFormatError(f"MELO factors of {t!r} must be finite floats lora_A (N·r, d_in), lora_B "
                                         f"(d_out, N·r) with r = {r} and one N for every module; got "
                                         f"{tuple(a.shape)} and {tuple(b.shape)}")
            n_blocks = a.shape[0] // r
            factors[t] = (a, b)
        if not 1 <= n_blocks <= config.num_blocks:
            raise AdapterFormatError(f"MELO holds {n_blocks} blocks; num_blocks allows 1..{config.num_blocks}")
        try:
            index = BlockIndex.checked(tensors["index.keys"], tensors["index.radii"], tensors["index.blocks"], n_blocks)
        except KeyError as e:
            raise AdapterFormatError(f"MELO tensor {e.args[0]!r} is missing from the adapter file") from None
        except ValueError as e:
            raise AdapterFormatError(f"the MELO index is malformed: {e}") from None
        blocks = extra.get("request_blocks") if isinstance(extra, dict) else None
        n_requests = len(common.get("requests") or [])
        if not (isinstance(blocks, list) and len(blocks) == n_requests and all(
                isinstance(j, int) and not isinstance(j, bool) and 0 <= j < n_blocks for j in blocks)
                and set(blocks) == set(range(n_blocks)) == set(index.blocks.tolist())):
            raise AdapterFormatError(f"MELO extra.request_blocks must give each of the {n_requests} requests a block "
                                     f"in 0..{n_blocks - 1}, every block used by a request and by the index; got {blocks!r}")
        return cls(index, factors, blocks, r, config.scale, **common)


# -- the method ------------------------------------------------------------------------------------
def _key_layer(model, config: MeloConfig) -> int:
    arch = get_arch(model)
    return arch.check_layer(config.key_layer) if config.key_layer is not None else int(0.7 * (arch.num_layers - 1))


def _lora_layers(model, config: MeloConfig) -> list[int]:
    arch, key = get_arch(model), _key_layer(model, config)
    if config.lora_layers is None:
        layers = [x for x in (key + 1, key + 2) if x < arch.num_layers]
        if not layers:
            raise ConfigError(f"key_layer {key} is this model's last block: the LoRA blocks need a block after it; "
                              "pass a smaller key_layer")
        return layers
    for x in config.lora_layers:
        arch.check_layer(x)
    early = [x for x in config.lora_layers if x < key]
    if early:
        raise ConfigError(f"lora_layers {early} come before key_layer {key}: the key is read before the blocks "
                          "act, so they must sit in that block or later ones")
    return list(config.lora_layers)


def _key_module(model, config: MeloConfig) -> str:
    return get_arch(model).mlp_out_name(_key_layer(model, config))


def _lora_modules(model, config: MeloConfig) -> list[str]:
    """The modules holding blocks, in forward order within each block; in the key layer itself only the
    key module (the FFN output projection, whose input is the key) may hold them."""
    arch, key = get_arch(model), _key_module(model, config)
    loras = match_modules(model, config.target_modules, _lora_layers(model, config), arch.layout.default_stack)
    prefix = arch.layer_name(_key_layer(model, config)) + "."
    early = [t for t in loras if t.startswith(prefix) and t != key]
    if early:
        raise ConfigError(f"{early} run before the key is read (the input of {key!r}); in the key layer only its "
                          "FFN output projection can hold blocks: choose later lora_layers or other target_modules")
    return loras


class Melo(editpeft.EditMethod):
    name = "melo"
    kind = "module_hook"
    topologies = ("causal", "seq2seq")
    Config = MeloConfig
    adapter_class = MeloAdapter

    def targets(self, model, config: MeloConfig) -> list[str]:
        key = _key_module(model, config)
        return [key, *(t for t in _lora_modules(model, config) if t != key)]

    def compute(self, model, tokenizer, requests: Sequence[EditRequest], config: MeloConfig) -> MeloAdapter:
        key = _key_module(model, config)
        d_key, _ = linear_dims(model.get_submodule(key))
        factors = {}
        for t in _lora_modules(model, config):
            d_in, d_out = linear_dims(model.get_submodule(t))
            factors[t] = (torch.zeros(0, d_in), torch.zeros(d_out, 0))
        empty = MeloAdapter(BlockIndex.empty(d_key), factors, [], config.rank_per_block, config.scale,
                            method=self.name, hparams=config.to_dict(), requests=[], targets=self.targets(model, config))
        return self._edit(empty, model, tokenizer, requests, config)

    def extend(self, adapter: MeloAdapter, model, tokenizer, requests: Sequence[EditRequest],
               config: MeloConfig) -> MeloAdapter:
        if self.targets(model, config) != adapter.targets or config.rank_per_block != adapter.rank:
            raise ConfigError("append=True must keep key_layer, lora_layers, target_modules and rank_per_block of "
                              "the adapter; add the edit under a new name to change them")
        with adapter.switched_off():     # the new adapter replaces this one; it is trained without it
            return self._edit(adapter, model, tokenizer, requests, config)

    def _edit(self, adapter: MeloAdapter, model, tokenizer, requests: Sequence[EditRequest],
              config: MeloConfig) -> MeloAdapter:
        key_module = model.get_submodule(adapter.targets[0])
        loras = list(adapter.factors)
        index, factors = adapter.index, dict(adapter.factors)
        all_requests, blocks = list(adapter.requests), list(adapter.request_blocks)
        r = config.rank_per_block
        for request in requests:
            batch = TargetBatch.for_model(model, tokenizer, [request.prompt], [request.target_new],
                                          device=model_device(model))
            acts = activations_at(model, key_module, batch.model_inputs())
            keys = acts.reshape(*batch.decoder_ids.shape, -1)[0, batch.target_positions(0).to(acts.device)].float()
            block = int(index.lookup(keys[:1])[0])
            n_blocks = factors[loras[0]][0].shape[0] // r
            if block == NO_BLOCK:
                if n_blocks >= config.num_blocks:
                    raise EditError(f"all {config.num_blocks} LoRA blocks of this MELO adapter are in use and the edit "
                                    "falls in no cluster's radius: raise num_blocks or add the edit under a new name")
                block = n_blocks
                with seeded_rng(config.seed * 100_003 + block, model_device(model)):
                    for t in loras:
                        fresh = LoraChange.fresh(model.get_submodule(t), r, config.scale, 0.0)
                        a, b = factors[t]
                        factors[t] = (torch.cat([a, fresh.a.float().cpu()]), torch.cat([b, fresh.b.float().cpu()], 1))
            index = index.add(keys, config.init_radius, block)
            members = [q for q, j in zip(all_requests, blocks) if j == block] if config.replay else []
            if config.max_replay is not None:
                members = members[len(members) - config.max_replay:] if config.max_replay else []
            factors = _train_block(model, tokenizer, key_module, loras, index, factors, block, [*members, request], config)
            all_requests.append(request)
            blocks.append(block)
            logger.info("melo %r -> block %d (%s), %d entries", request.prompt, block,
                        "new" if block == n_blocks else "joined", len(index))
        return MeloAdapter(index, factors, blocks, r, config.scale, method=self.name, hparams=config.to_dict(),
                           requests=all_requests, targets=list(adapter.targets))


def _train_block(model, tokenizer, key_module, loras: list[str], index: BlockIndex,
                 factors: dict[str, tuple[torch.Tensor, torch.Tensor]], block: int, requests: list[EditRequest],
                 config: MeloConfig) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Train block ``block`` of every LoRA module on ``requests`` with the index routing each token."""
    device = model_device(model)
    r, scale = config.rank_per_block, config.scale
    batch = TargetBatch.for_model(model, tokenizer, [q.prompt for q in requests], [q.target_new for q in requests],
                                  device=device)
    inputs = batch.model_inputs()
    acts = activations_at(model, key_module, inputs)
    route = index.to(device).lookup(acts.reshape(-1, acts.shape[-1]))          # fixed: keys precede the blocks
    where = batch.target_where().to(device)
    first = min(get_arch(model).layer_of(t) for t in loras)
    suffix = BlockSuffix.capture(model, first, inputs, where) if not batch.is_seq2seq else None
    modules = {t: model.get_submodule(t) for t in loras}
    fixed = {t: (a.to(device), b.to(device)) for t, (a, b) in factors.items()}
    lo, hi = block * r, (block + 1) * r

    def loss(p: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        with ExitStack() as stack:
            for t, module in modules.items():
                a0, b0 = fixed[t]
                a = torch.cat([a0[:lo], p[f"{t}:A"], a0[hi:]])
                b = torch.cat([b0[:, :lo], p[f"{t}:B"], b0[:, hi:]], 1)
                stack.enter_context(output_edit(module, lambda x, out, a=a, b=b: routed_lora(
                    x, out, route, a.to(x.dtype), b.to(x.dtype), r, scale)))
            if suffix is not None:
                logits = suffix.logits(where)
            else:
                logits = model(**inputs, use_cache=False).logits[where[:, 0], where[:, 1]]
        return {"target": batch.flat_target_nll(logits)}

    start = {}
    for t, (a, b) in fixed.items():
        start[f"{t}:A"], start[f"{t}:B"] = a[lo:hi], b[:, lo:hi]
    result = train_tensors(start, loss, TrainConfig(steps=config.steps, lr=config.lr, stop_loss=config.stop_loss,
                                                    desc="melo"))
    out = {}
    for t, (a, b) in factors.items():
        a, b = a.clone(), b.clone()
        a[lo:hi] = result.params[f"{t}:A"].float().cpu()
        b[:, lo:hi] = result.params[f"{t}:B"].float().cpu()
        out[t] = (a, b)
    return out
