"""Model-level routers around ``forward`` and ``generate``: one decision per sequence.

A router adapter (:class:`~editpeft.RouterAdapter`) decides once per sequence, from the prompt
the caller gave, whether each row is in its scope and how such a row is computed (a
:class:`Route`: token ids prepended out of the caller's sight, a side model that replaces the
base model for that row, and a router-specific ``entry``). The decision is kept for every
later forward of that sequence: the generated tokens of ``model.generate`` and the steps of a
manual decoding loop that passes ``past_key_values`` back.

How a routed forward is computed (*shadow computation*):

1. The base model runs on the caller's batch exactly as given (same inputs, same cache), so
   out-of-scope rows and the caller's KV cache are bit-identical to the unedited model's.
2. In-scope rows are grouped by the model that serves them (the base model when a route only
   prepends tokens, else the side model). Each group runs its rows with the rewritten inputs
   (``prefix + the row's tokens``, left-padded; attention mask and position ids built for the
   rewritten rows) and a private KV cache kept in the sequence's :class:`RoutingSession`.
3. The group's logits replace the base logits of its rows, right-aligned, so the output has the
   caller's sequence length and scores/logits of ``generate`` are those of the caller's tokens.
4. ``route(model, inputs, call_next)`` hooks of the routers wrap steps 1-3 in insertion order
   (the first router is outermost); inside them :func:`current_session` gives the sequence's
   decisions and all its tokens so far.

Sessions are found by the caller's cache object (weakly referenced: a session dies with its
cache), or, inside ``generate``, by the generation call (also when ``use_cache=False``). A
forward without a cache, or with an empty one, starts a new sequence. In-scope rows cost one
extra forward of their group; when no router is live, ``forward``/``generate`` are the base
model's own, untouched.

Limits: decisions need token ids (a forward given only ``inputs_embeds`` is not routed) and a
decoder-only model (on encoder-decoder models only ``route`` hooks apply). Beam search, assisted
and contrastive decoding reorder or crop the cache: they raise :class:`RoutingError` when a row
is in scope of a router. Attentions and hidden states returned for in-scope rows are the base
model's; a ``labels`` loss is recomputed from the routed logits.

Example:
    >>> class Demo(editpeft.RouterAdapter):                                       # doctest: +SKIP
    ...     def decide(self, model, prompts):
    ...         return [Route(prefix=(5, 6, 7)) if 42 in prompts.tokens(i) else None
    ...                 for i in range(len(prompts))]
    >>> model.generate(**batch, max_new_tokens=10)                                # doctest: +SKIP
"""
from __future__ import annotations

import inspect
import logging
import weakref
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Mapping, Sequence

import torch
from torch import nn

from .errors import AdapterFormatError, RoutingError
from .tokens import cache_in, pad_id

if TYPE_CHECKING:  # pragma: no cover
    from .adapters import RouterAdapter

logger = logging.getLogger(__name__)

SIDE_PREFIX = "side."


@dataclass(frozen=True)
class Route:
    """How one in-scope row is computed.

    ``prefix``: token ids prepended to the row (hidden from the caller: outputs cover only the
    caller's tokens). ``side_model``: the name of one of the router's ``side_modules()`` that
    serves the row instead of the base model (``None``: the base model). ``entry``: anything the
    router wants to remember about this row (e.g. which memory entry matched); read it back in
    ``route`` through :func:`current_session`.

    Example:
        >>> Route(prefix=(12, 7, 99), entry=0)
        Route(prefix=(12, 7, 99), side_model=None, entry=0)
    """

    prefix: tuple[int, ...] = ()
    side_model: str | None = None
    entry: Any = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "prefix", tuple(int(t) for t in self.prefix))


class Prompts:
    """The prompts a router decides on: the caller's token ids and attention mask (any padding
    side) plus the model's tokenizer.

    Example:
        >>> p = Prompts(torch.tensor([[0, 5, 6]]), torch.tensor([[0, 1, 1]]))
        >>> len(p), p.tokens(0)
        (1, [5, 6])
    """

    def __init__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, tokenizer=None):
        self.input_ids = input_ids
        self.attention_mask = attention_mask if attention_mask is not None else torch.ones_like(input_ids)
        self.tokenizer = tokenizer

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])

    def positions(self, row: int) -> list[int]:
        """Column indices of row ``row``'s real (unpadded) tokens."""
        return torch.nonzero(self.attention_mask[row]).flatten().tolist()

    def tokens(self, row: int) -> list[int]:
        """Row ``row``'s real tokens, without padding."""
        return self.input_ids[row][self.attention_mask[row].bool()].tolist()

    def texts(self) -> list[str]:
        """Every row decoded (needs the tokenizer), e.g. for a scope classifier."""
        if self.tokenizer is None:
            raise RoutingError("these prompts carry no tokenizer; call enable_editing(model, tokenizer)")
        return [self.tokenizer.decode(self.tokens(i), skip_special_tokens=True) for i in range(len(self))]


# -- side models ---------------------------------------------------------------------------
def side_state_dict(modules: Mapping[str, nn.Module]) -> dict[str, torch.Tensor]:
    """Tensors of named side modules as ``side.<name>.<param>`` (tied weights stored once).

    Example:
        >>> sorted(side_state_dict({"head": nn.Linear(2, 1)}))
        ['side.head.bias', 'side.head.weight']
    """
    out: dict[str, torch.Tensor] = {}
    for name, module in modules.items():
        _check_side_name(name)
        seen: set[tuple] = set()
        for key, t in module.state_dict().items():
            ident = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.dtype)
            if t.numel() and ident in seen:
                continue            # a tied weight: restored by the module's own tying
            seen.add(ident)
            out[f"{SIDE_PREFIX}{name}.{key}"] = t.detach()
    return out


def split_side_tensors(tensors: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, dict[str, torch.Tensor]]]:
    """Split saved tensors into the router's own and ``{side name: state dict}``.

    Example:
        >>> own, sides = split_side_tensors({"t": torch.zeros(1), "side.cf.w": torch.ones(1)})
        >>> sorted(own), sorted(sides["cf"])
        (['t'], ['w'])
    """
    own: dict[str, torch.Tensor] = {}
    sides: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in tensors.items():
        if key.startswith(SIDE_PREFIX):
            name, _, rest = key[len(SIDE_PREFIX):].partition(".")
            sides.setdefault(name, {})[rest] = t
        else:
            own[key] = t
    return own, sides


def load_side_state(module: nn.Module, tensors: Mapping[str, torch.Tensor], name: str = "side") -> nn.Module:
    """Load ``tensors`` (from :func:`split_side_tensors`) into ``module``; tied weights may be
    absent. Raises :class:`AdapterFormatError` when keys are missing or unexpected, or a tensor's
    shape or kind (floating or integer) differs from the module's."""
    own = module.state_dict()
    for key, t in tensors.items():
        if key in own and (t.shape != own[key].shape or t.is_floating_point() != own[key].is_floating_point()):
            raise AdapterFormatError(f"side model {name!r}: tensor {key!r} is {tuple(t.shape)} {t.dtype}, the model "
                                     f"needs {tuple(own[key].shape)} {own[key].dtype}; the adapter is corrupt or "
                                     "was modified")
    missing, unexpected = module.load_state_dict(dict(tensors), strict=False)
    loaded = {module.state_dict()[k].data_ptr() for k in tensors if k in module.state_dict()}
    untied = [k for k in missing if module.state_dict()[k].data_ptr() not in loaded]
    if untied or unexpected:
        raise AdapterFormatError(f"side model {name!r} does not match its saved tensors (missing "
                                 f"{untied[:5]}, unexpected {list(unexpected)[:5]}); the adapter was "
                                 "saved from another side-model architecture")
    return module.eval()


def causal_lm_spec(model: nn.Module) -> dict[str, Any]:
    """JSON description of a transformers causal LM (its config), for ``extra_config()``."""
    config = model.config.to_dict()
    config.pop("transformers_version", None)
    return {"config": config}


def build_causal_lm(spec: Mapping[str, Any], tensors: Mapping[str, torch.Tensor] | None = None) -> nn.Module:
    """An uninitialised transformers causal LM from :func:`causal_lm_spec` (no download, no
    pickle); load its weights with :func:`load_side_state`. With the saved ``tensors`` the config
    is first built on the meta device and refused unless the saved tensors can fill it, so a
    hostile config cannot make editpeft allocate more than the file holds."""
    from transformers import AutoConfig, AutoModelForCausalLM
    if not isinstance(spec, Mapping) or not isinstance(spec.get("config"), Mapping):
        raise AdapterFormatError("a saved side model needs {'config': {...}}; save the adapter again")
    config = dict(spec["config"])
    model_type = config.pop("model_type", None)
    if not model_type or not isinstance(model_type, str):
        raise AdapterFormatError("a saved side model lacks its model_type; save the adapter again")
    try:
        cfg = AutoConfig.for_model(model_type, **config)
        if tensors is not None:
            with torch.device("meta"):
                needed = sum(p.numel() for p in AutoModelForCausalLM.from_config(cfg).parameters())
            held = sum(t.numel() for t in tensors.values())
            if needed > held:
                raise AdapterFormatError(f"the saved side model's config needs {needed:,} parameters but the file "
                                         f"holds {held:,}; the adapter is corrupt or was modified")
        return AutoModelForCausalLM.from_config(cfg).eval()
    except AdapterFormatError:
        raise
    except Exception as e:   # an invalid config: unknown model type, wrong field types or values
        raise AdapterFormatError(f"the saved side model's config is invalid ({type(e).__name__}: "
                                 f"{str(e)[:200]}); save the adapter again") from None


def _check_side_name(name: str) -> None:
    if not name or "." in name:
        raise RoutingError(f"side module name {name!r} must be non-empty and contain no '.'")


def _place(module: nn.Module, device: torch.device, dtype: torch.dtype) -> nn.Module:
    """Move a side module to the base model's device and floating dtype (lazily, in place)."""
    p = next((p for p in module.parameters() if p.is_floating_point()), None)
    if p is not None and (p.device != device or p.dtype != dtype):
        logger.debug("moving a side module to %s/%s", device, dtype)
        module.to(device=device, dtype=dtype)
    if module.training:
        module.eval()
    return module


def _base_place(model: nn.Module) -> tuple[torch.device, torch.dtype]:
    p = next((p for p in model.parameters() if p.is_floating_point()), None)
    if p is None:
        return torch.device("cpu"), torch.float32
    return p.device, p.dtype


# -- sessions ------------------------------------------------------------------------------
class _Group:
    """Rows served by one model (the base or a side model) with rewritten inputs and a private cache."""

    def __init__(self, label: str, runner: Callable[..., Any], rows: list[int], prefixes: list[tuple[int, ...]],
                 pad_id: int):
        self.label = label
        self.runner = runner
        self.rows = rows
        self.prefixes = prefixes
        self.pad_id = pad_id
        self.cache: Any = None
        self.mask: torch.Tensor | None = None
        params = inspect.signature(getattr(runner, "forward", runner)).parameters
        self.takes_positions = "position_ids" in params
        self.cache_kwarg = "cache" if "cache" in params else "past_key_values"      # see tokens.cache_in

    def _call(self, ids: torch.Tensor, mask: torch.Tensor, n_new: int, cache: Any, use_cache: bool) -> torch.Tensor:
        kwargs: dict[str, Any] = {"input_ids": ids, "attention_mask": None if bool(mask.all()) else mask,
                                  self.cache_kwarg: cache, "use_cache": use_cache, "return_dict": True}
        if self.takes_positions:
            pos = (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 0)
            kwargs["position_ids"] = pos[:, -n_new:]
        out = self.runner(**kwargs)
        self.cache = cache_in(out) if use_cache else None
        return out.logits

    def fresh(self, ids: torch.Tensor, mask: torch.Tensor, use_cache: bool) -> torch.Tensor:
        """Run the rows from scratch: ``prefix + the caller's row`` (common padding dropped)."""
        index = torch.tensor(self.rows, device=ids.device)
        ids, mask = ids.index_select(0, index), mask.index_select(0, index)
        used = torch.nonzero(mask.any(0)).flatten()
        start = int(used[0]) if len(used) else 0
        ids, mask = ids[:, start:], mask[:, start:]
        width = max(len(p) for p in self.prefixes)
        if width:
            pre = torch.full((len(self.rows), width), self.pad_id, dtype=ids.dtype, device=ids.device)
            pre_mask = torch.zeros((len(self.rows), width), dtype=mask.dtype, device=mask.device)
            for i, p in enumerate(self.prefixes):
                if p:
                    pre[i, width - len(p):] = torch.tensor(p, dtype=ids.dtype, device=ids.device)
                    pre_mask[i, width - len(p):] = 1
            ids, mask = torch.cat([pre, ids], 1), torch.cat([pre_mask, mask], 1)
        self.mask = mask
        return self._call(ids, mask, ids.shape[1], None, use_cache)

    def step(self, new_ids: torch.Tensor, new_mask: torch.Tensor) -> torch.Tensor:
        """Continue the rows' private cache with the caller's new tokens."""
        index = torch.tensor(self.rows, device=new_ids.device)
        ids = new_ids.index_select(0, index)
        self.mask = torch.cat([self.mask, new_mask.index_select(0, index).to(self.mask.dtype)], 1)
        return self._call(ids, self.mask, ids.shape[1], self.cache, True)

    def crop(self, n: int) -> bool:
        """Forget the last ``n`` steps (the caller's cache was cropped); False if impossible."""
        if self.cache is None or not hasattr(self.cache, "crop") or self.mask is None:
            return False
        self.cache.crop(self.mask.shape[1] - n)
        self.mask = self.mask[:, : self.mask.shape[1] - n]
        return True


class RoutingSession:
    """One batch of sequences under routing: the decisions made from its prompt, its tokens so
    far and the private caches of its in-scope rows.

    Inside a router's ``route`` use :func:`current_session`; ``routes(self)`` gives this
    router's decision per row (a :class:`Route` or ``None`` when out of scope) and
    ``input_ids``/``attention_mask`` all the caller's tokens so far (prompt + generated, the
    last columns being those of the current forward).
    """

    def __init__(self, routers: Sequence["RouterAdapter"], decisions: list[list[Route | None]],
                 input_ids: torch.Tensor, attention_mask: torch.Tensor):
        self.routers = tuple(routers)
        self._decisions = {id(r): d for r, d in zip(routers, decisions)}
        self.input_ids = input_ids
        self.attention_mask = attention_mask
        self.prompt_length = int(input_ids.shape[1])
        self.groups: list[_Group] = []
        self.cache_length = 0

    def routes(self, router: "RouterAdapter") -> list[Route | None]:
        """``router``'s decision for every row of the batch."""
        try:
            return self._decisions[id(router)]
        except KeyError:
            raise RoutingError(f"router {router.name!r} is not part of this routing session") from None

    @property
    def in_scope(self) -> list[bool]:
        """Whether any router took each row."""
        return [any(d[i] is not None for d in self._decisions.values()) for i in range(self.input_ids.shape[0])]

    def same_routers(self, routers: Sequence["RouterAdapter"]) -> bool:
        return len(routers) == len(self.routers) and all(a is b for a, b in zip(routers, self.routers))


class _Generation:
    """One ``generate`` call: its session is made at its first forward."""

    def __init__(self, unsupported: str | None = None) -> None:
        self.session: RoutingSession | None = None
        self.unsupported = unsupported      # a decoding mode that reorders/crops the cache


class RoutingState:
    """Per-model routing bookkeeping: sessions by cache object, running generations, and the
    session of the forward now running (for :func:`current_session`)."""

    def __init__(self) -> None:
        self._by_cache: dict[int, tuple[weakref.ref, RoutingSession]] = {}
        self.generations: list[_Generation] = []
        self.current: RoutingSession | None = None
        self.deciding = False

    def register(self, cache: Any, session: RoutingSession) -> None:
        key = _cache_key(cache)
        if key is None:
            return
        k = id(key)
        entry = self._by_cache.get(k)
        if entry is not None and entry[0]() is key:
            self._by_cache[k] = (entry[0], session)
            return
        table = self._by_cache

        def forget(_ref: weakref.ref, k: int = k) -> None:
            cur = table.get(k)
            if cur is not None and cur[0] is _ref:
                del table[k]
        try:
            self._by_cache[k] = (weakref.ref(key, forget), session)
        except TypeError:
            logger.debug("cannot track a %s cache; later steps of this sequence are not routed", type(key).__name__)

    def lookup(self, cache: Any) -> RoutingSession | None:
        key = _cache_key(cache)
        entry = self._by_cache.get(id(key)) if key is not None else None
        if entry is not None and entry[0]() is key:
            return entry[1]
        return None


def routing_state(model: nn.Module) -> RoutingState:
    """The routing sessions of an editable model (kept on its edit state)."""
    return model._editpeft.routing


def current_session(model: nn.Module) -> RoutingSession | None:
    """The routing session of the forward now running on ``model`` (``None`` outside a routed
    forward, or when the forward is not routed: e.g. only ``inputs_embeds`` were given).

    Example:
        >>> def route(self, model, inputs, call_next):                            # doctest: +SKIP
        ...     out = call_next(inputs)
        ...     session = current_session(model)
        ...     mine = session.routes(self) if session is not None else []
    """
    state = getattr(model, "_editpeft", None)
    rs = getattr(state, "routing", None)
    return rs.current if rs is not None else None


def _cache_key(cache: Any) -> Any:
    if cache is None:
        return None
    if isinstance(cache, (tuple, list)):
        leaf = cache
        while isinstance(leaf, (tuple, list)) and leaf:
            leaf = leaf[0]
        return leaf if isinstance(leaf, torch.Tensor) else None
    return cache


def _cache_length(cache: Any) -> int:
    if cache is None:
        return 0
    if hasattr(cache, "get_seq_length"):
        return int(cache.get_seq_length())
    key = _cache_key(cache)
    return int(key.shape[-2]) if isinstance(key, torch.Tensor) and key.dim() >= 2 else 0


def _new_session(model: nn.Module, routers: Sequence["RouterAdapter"], base_forward: Callable,
                 ids: torch.Tensor, mask: torch.Tensor) -> RoutingSession:
    """Decide every row once from the prompt and group the in-scope rows by serving model."""
    tokenizer = model._editpeft.tokenizer
    prompts = Prompts(ids, mask, tokenizer)
    device, dtype = _base_place(model)
    decisions: list[list[Route | None]] = []
    for router in routers:
        sides = router.side_modules()
        for name, module in sides.items():
            _check_side_name(name)
            _place(module, device, dtype)
        rs = routing_state(model)
        rs.deciding = True                  # model calls inside decide() run without routers
        try:
            with torch.no_grad():
                routes = list(router.decide(model, prompts))
        finally:
            rs.deciding = False
        if len(routes) != len(prompts) or not all(r is None or isinstance(r, Route) for r in routes):
            raise RoutingError(f"router {router.name!r} ({type(router).__name__}.decide) must return one "
                               f"Route or None per row ({len(prompts)} rows), got {routes!r:.200}")
        for r in routes:
            if r is not None and r.side_model is not None and r.side_model not in sides:
                raise RoutingError(f"router {router.name!r} routed a row to side model {r.side_model!r}, "
                                   f"but its side_modules() are {sorted(sides)}")
        decisions.append(routes)
    session = RoutingSession(routers, decisions, ids, mask)
    plans: dict[Any, tuple[str, Callable, list[int], list[tuple[int, ...]]]] = {}
    for row in range(len(prompts)):
        prefix: tuple[int, ...] = ()
        server: tuple[Any, str, Callable] | None = None
        for router, routes in zip(routers, decisions):
            r = routes[row]
            if r is None:
                continue
            prefix += r.prefix
            if server is None and r.side_model is not None:
                module = router.side_modules()[r.side_model]
                server = (id(module), f"{router.name}/{r.side_model}", module)
        if server is None:
            if not prefix:
                continue                    # in scope, computed by the base model as is
            server = ("base", "base model", base_forward)
        key, label, runner = server
        group = plans.setdefault(key, (label, runner, [], []))
        group[2].append(row)
        group[3].append(prefix)
    pad = pad_id(tokenizer) if tokenizer is not None else 0
    session.groups = [_Group(label, runner, rows, prefixes, pad) for label, runner, rows, prefixes in plans.values()]
    if session.groups:
        logger.debug("routing session: %s", ", ".join(f"{g.label} rows {g.rows}" for g in session.groups))
    return session


def _find_session(model: nn.Module, rs: RoutingState, routers: Sequence["RouterAdapter"], base_forward: Callable,
                  inputs: dict[str, Any]) -> tuple[RoutingSession | None, str]:
    """The session of this forward and its mode: ``"fresh"`` (whole sequences) or ``"step"``."""
    ids, mask, cache = inputs.get("input_ids"), inputs.get("attention_mask"), cache_in(inputs)
    generation = rs.generations[-1] if rs.generations else None
    if ids is None or (mask is not None and mask.dim() != 2) or getattr(model.config, "is_encoder_decoder", False):
        return None, ""                     # only route() hooks apply (see the module docstring)
    past = _cache_length(cache)
    if past > 0:
        session = rs.lookup(cache)
        if session is None:
            logger.debug("a forward continues a cache that no routing session knows; it is not routed")
            return None, ""
        if not session.same_routers(routers):
            logger.warning("the live routers changed during a sequence; its remaining steps are not routed "
                           "(start a new sequence to route it with the current edits)")
            return None, ""
        if ids.shape[0] != session.input_ids.shape[0]:
            (logger.warning if any(session.in_scope) else logger.debug)(
                "a cache was continued with %d rows instead of its %d (expanded or reordered); the "
                "remaining steps are not routed", ids.shape[0], session.input_ids.shape[0])
            return None, ""
        if past != session.cache_length:
            n = session.cache_length - past
            if n < 0 or not all(g.crop(n) for g in session.groups):
                logger.warning("this sequence's cache changed outside editpeft's routing; its remaining "
                               "steps are not routed")
                return None, ""
            keep = session.input_ids.shape[1] - n
            session.input_ids, session.attention_mask = session.input_ids[:, :keep], session.attention_mask[:, :keep]
            session.cache_length = past
        if generation is not None and generation.session is None:
            generation.session = session
        new_mask = mask[:, -ids.shape[1]:] if mask is not None else torch.ones_like(ids)
        session.input_ids = torch.cat([session.input_ids, ids], 1)
        session.attention_mask = torch.cat([session.attention_mask, new_mask.to(session.attention_mask.dtype)], 1)
        return session, "step"
    full_mask = mask if mask is not None else torch.ones_like(ids)
    if generation is not None and generation.session is not None:
        session = generation.session        # generate(use_cache=False): the whole sequence again
        if not session.same_routers(routers):
            return None, ""
        session.input_ids, session.attention_mask = ids, full_mask
        return session, "fresh"
    session = _new_session(model, routers, base_forward, ids, full_mask)
    if generation is not None:
        if generation.unsupported and any(session.in_scope):
            raise RoutingError(f"{generation.unsupported} reorders or crops the KV cache, which a router "
                               "edit in scope of this prompt cannot follow; use greedy decoding or sampling, "
                               "or switch the router edits off with model.disabled_edits()")
        generation.session = session
    return session, "fresh"


def _causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    shift = logits[:, :-1].float().reshape(-1, logits.shape[-1])
    return torch.nn.functional.cross_entropy(shift, labels[:, 1:].reshape(-1).to(shift.device), ignore_index=-100)


def _core(base_forward: Callable, session: RoutingSession | None, mode: str, inputs: dict[str, Any]) -> Any:
    """Steps 1-3 of the module docstring: the base batch, then each group spliced in."""
    if session is None or not session.groups:
        return base_forward(**inputs, return_dict=True)
    inputs = dict(inputs)
    labels = inputs.pop("labels", None)
    out = base_forward(**inputs, return_dict=True)
    logits = out.logits
    if torch.is_grad_enabled() and logits.requires_grad:
        logits = logits.clone()
    ids, mask = inputs["input_ids"], inputs.get("attention_mask")
    for group in session.groups:
        if mode == "step":
            new_mask = mask[:, -ids.shape[1]:] if mask is not None else torch.ones_like(ids)
            g = group.step(ids, new_mask)
        else:
            full = mask if mask is not None else torch.ones_like(ids)
            g = group.fresh(ids, full, use_cache=cache_in(out) is not None)
        if g.shape[-1] != logits.shape[-1]:
            raise RoutingError(f"{group.label} gives logits over {g.shape[-1]} tokens but the base model over "
                               f"{logits.shape[-1]}; a side model must share the base model's tokenizer")
        k = min(logits.shape[1], g.shape[1])
        index = torch.tensor(group.rows, device=logits.device)
        logits[index, logits.shape[1] - k:] = g[:, g.shape[1] - k:].to(device=logits.device, dtype=logits.dtype)
    out.logits = logits
    if labels is not None:
        out.loss = _causal_lm_loss(logits, labels)
    return out


def routed_forward(model: nn.Module, routers: Sequence["RouterAdapter"], base_forward: Callable,
                   inputs: dict[str, Any]) -> Any:
    """``model.forward(**inputs)`` under ``routers`` (live, in insertion order)."""
    rs = routing_state(model)
    if rs.deciding:
        return base_forward(**inputs)
    return_dict = inputs.pop("return_dict", None)
    session, mode = _find_session(model, rs, routers, base_forward, inputs)
    hooks = [r for r in routers if not getattr(type(r).route, "passthrough", False)]

    def call(i: int, args: dict[str, Any]) -> Any:
        if i == len(hooks):
            return _core(base_forward, session, mode, args)
        return hooks[i].route(model, args, lambda nxt: call(i + 1, nxt))

    previous, rs.current = rs.current, session
    try:
        out = call(0, inputs)
    finally:
        rs.current = previous
    cache = cache_in(out)
    if session is not None and cache is not None:
        session.cache_length = _cache_length(cache)
        rs.register(cache, session)
    if return_dict is False and hasattr(out, "to_tuple"):
        return out.to_tuple()
    return out


_UNSUPPORTED = {"num_beams": "beam search", "assistant_model": "assisted decoding",
                "prompt_lookup_num_tokens": "prompt-lookup decoding", "penalty_alpha": "contrastive search",
                "dola_layers": "DoLa decoding"}


def _unsupported_decoding(model: nn.Module, kwargs: Mapping[str, Any]) -> str | None:
    """A description of a decoding mode that reorders or crops the cache, or None."""
    config = kwargs.get("generation_config") or getattr(model, "generation_config", None)
    for key, what in _UNSUPPORTED.items():
        value = kwargs.get(key, getattr(config, key, None))
        if (value or 1) > 1 if key == "num_beams" else value is not None:
            return f"{what} ({key}={value!r})"
    return None


def routed_generate(model: nn.Module, base_generate: Callable, args: tuple, kwargs: dict[str, Any]) -> Any:
    """``model.generate`` with one routing session for the whole call (see the module docstring)."""
    rs = routing_state(model)
    if rs.deciding:
        return base_generate(*args, **kwargs)
    generation = _Generation(_unsupported_decoding(model, kwargs))
    rs.generations.append(generation)
    try:
        return base_generate(*args, **kwargs)
    finally:
        rs.generations.remove(generation)
