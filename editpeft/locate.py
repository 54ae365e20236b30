"""Shared machinery of the locate-then-edit family (ROME, MEMIT, AlphaEdit, EMMET).

- :func:`context_templates`: random prefixes sampled from the model (ROME §3.1: keys are
  averaged "over a small set of texts x_j ... sampled by generating from G").
- :func:`subject_keys`: k* = mean_j k(x_j + s), the input of the edited module at the subject's
  last token (ROME Eq. 3).
- :func:`optimize_value`: the residual delta that makes the model emit the new object, with
  ROME's KL essence term and weight decay, and the norm clamp (ROME Eq. 4 and its code); its
  steps run only the blocks from the edited one up (:class:`~editpeft.suffix.BlockSuffix`).

Example:
    >>> templates = context_templates(model, tokenizer)                           # doctest: +SKIP
    >>> keys = subject_keys(model, tokenizer, "model.layers.4.mlp.down_proj", [req], templates)  # doctest: +SKIP
"""
from __future__ import annotations

import inspect
import logging
import math
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Sequence

import torch
import torch.nn.functional as F

from .arch import get_arch
from .probe import activations_at, as_btd, output_edit
from .corpus import CORPORA
from .errors import EditOptimizationError
from .method import MethodConfig, check
from .request import EditRequest
from .stats import second_moment
from .suffix import BlockSuffix
from .tokens import TargetBatch, seeded_generate

logger = logging.getLogger(__name__)

STARTERS = ("The", "Therefore", "Because", "I", "You")


def _state(model):
    return getattr(model, "_editpeft", None)


def context_templates(model, tokenizer, lengths: Sequence[tuple[int, int]] = ((10, 5),), seed: int = 0) -> list[str]:
    """``["{}"]`` plus ``n`` sampled prefixes of ``length`` tokens for each ``(length, n)``.

    Sampled from the unedited model (top-k 5) with a fixed seed and no effect on the global RNG;
    memoised on the model's edit state.
    """
    state = _state(model)
    key = (tuple(map(tuple, lengths)), seed)
    if state is not None and key in state.caches.context_templates:
        return state.caches.context_templates[key]
    templates = ["{}"]
    ctx = state.disabled() if state is not None else nullcontext()
    batches = [([STARTERS[i % len(STARTERS)] for i in range(n)], length) for length, n in lengths]
    with ctx:
        try:
            outs = seeded_generate(model, tokenizer, batches, seed=seed, top_k=5)
        except RuntimeError as e:
            raise EditOptimizationError(f"sampling context prefixes failed ({e}): the model produces "
                                        "non-finite outputs; the model was left unchanged") from None
    for out in outs:
        for text in tokenizer.batch_decode(out, skip_special_tokens=True):
            templates.append(text.replace("{", " ").replace("}", " ").strip() + ". {}")
    if state is not None:
        state.caches.context_templates[key] = templates
    return templates


def in_template(template: str, request: EditRequest) -> tuple[str, tuple[int, int] | None]:
    """The request's prompt placed in a ``"...{}"`` template, with its shifted subject span."""
    offset = template.index("{}")
    text = template[:offset] + request.prompt + template[offset + 2:]
    span = request.subject_span
    return text, (span[0] + offset, span[1] + offset) if span else None


def subject_keys(model, tokenizer, module_name: str, requests: Sequence[EditRequest],
                 templates: Sequence[str]) -> torch.Tensor:
    """k* per request: the module input at the subject's last token, averaged over templates.

    Returns a (len(requests), in_features) float32 tensor.
    """
    return subject_activations(model, tokenizer, module_name, requests, templates, "input")


def subject_activations(model, tokenizer, module_name: str, requests: Sequence[EditRequest],
                        templates: Sequence[str], which: str = "input") -> torch.Tensor:
    """A module's input (``which="input"``) or output (``"output"``; the hidden states of a
    decoder block) at each request's subject's last token, averaged over ``templates``.

    Returns a (len(requests), dim) float32 tensor.
    """
    module = model.get_submodule(module_name)
    texts, spans = [], []
    for r in requests:
        for t in templates:
            text, span = in_template(t, r)
            texts.append(text)
            spans.append(span)
    batch = TargetBatch.build(tokenizer, texts, subject_spans=spans, device=next(model.parameters()).device)
    acts = as_btd(activations_at(model, module, batch.model_inputs(), which), batch.input_ids)
    rows = torch.arange(len(texts), device=acts.device)
    at_subject = acts[rows, torch.tensor(batch.subject_last, device=acts.device)].float()
    return at_subject.view(len(requests), len(templates), -1).mean(1)


def forward_logits(model, batch: TargetBatch, positions: torch.Tensor) -> torch.Tensor:
    """Logits at ``positions`` only (shape B × len(positions) × V) when the model supports
    ``logits_to_keep``; the LM head over every position is the most expensive part of a small
    model's forward."""
    inputs = dict(batch.model_inputs(), use_cache=False)
    if "logits_to_keep" in inspect.signature(model.forward).parameters:
        return model(**inputs, logits_to_keep=positions).logits
    return model(**inputs).logits[:, positions]


@dataclass
class LocateEditConfig(MethodConfig):
    """Hyper-parameters every locate-then-edit method shares: the target-value optimisation
    (:func:`optimize_value`), the context prefixes and the key statistics."""

    v_steps: int = field(default=25, metadata={"help": "maximum gradient steps of the value optimisation"})
    v_lr: float = field(default=2.0, metadata={"help": "Adam learning rate of the value optimisation"})
    v_weight_decay: float = field(default=0.5, metadata={"help": "weight of |delta|/|v|^2 in the loss"})
    kl_factor: float = field(default=0.0625, metadata={"help": "weight of the KL essence term"})
    clamp_norm_factor: float = field(default=4.0, metadata={"help": "|delta| <= factor * |v|"})
    stop_nll: float = field(default=0.05, metadata={"help": "stop once the target's NLL is below this"})
    context_lengths: list = field(default_factory=lambda: [[5, 5]],
                                  metadata={"help": "[[tokens, count], ...] of sampled context prefixes"})
    stats_corpus: str = field(default="pydoc", metadata={"help": f"corpus of the key statistics: {CORPORA}"})
    stats_tokens: int = field(default=40_000, metadata={"help": "tokens used for the key statistics"})
    seed: int = field(default=0, metadata={"help": "seed of the context-prefix sampling"})
    suffix_replay: bool = field(default=True, metadata={
        "help": "replay only the blocks from the edited one up during the value optimisation (exact; "
                "checked on the first step, falls back to the whole model)"})

    def validate(self) -> None:
        check(self.v_steps >= 1, "v_steps must be >= 1")
        check(self.v_lr > 0, "v_lr must be > 0")
        check(self.clamp_norm_factor > 0, "clamp_norm_factor must be > 0")
        check(self.stats_corpus in CORPORA, f"stats_corpus must be one of {CORPORA}")
        check(self.stats_tokens >= 1000, "stats_tokens must be >= 1000")
        check(all(len(p) == 2 and p[0] >= 1 and p[1] >= 0 for p in self.context_lengths),
              "context_lengths must be [[tokens, count], ...]")

    def value_options(self) -> dict:
        """Keyword arguments of :func:`optimize_value`."""
        return dict(steps=self.v_steps, lr=self.v_lr, kl_factor=self.kl_factor, weight_decay=self.v_weight_decay,
                    clamp_norm_factor=self.clamp_norm_factor, stop_nll=self.stop_nll, suffix=self.suffix_replay)


def key_statistics(model, tokenizer, module_name: str, config: LocateEditConfig) -> torch.Tensor:
    """C = E[k kᵀ] of ``module_name``'s inputs on the config's corpus (cached, see :mod:`editpeft.stats`)."""
    return second_moment(model, tokenizer, module_name, corpus=config.stats_corpus, n_tokens=config.stats_tokens)


@dataclass
class ValueResult:
    delta: torch.Tensor        # (out_features,) change of the module output at the subject
    init_norm: float           # norm of the module output it changes
    loss: float
    nll: float
    steps: int


def optimize_value(model, tokenizer, module_name: str, request: EditRequest, templates: Sequence[str],
                   **options) -> ValueResult:
    """:func:`optimize_values` for one request."""
    return optimize_values(model, tokenizer, module_name, [request], templates, **options)[0]


def optimize_values(model, tokenizer, module_name: str, requests: Sequence[EditRequest], templates: Sequence[str], *,
                    steps: int, lr: float, kl_factor: float, weight_decay: float, clamp_norm_factor: float,
                    kl_prompt: str = "{} is a", stop_nll: float = 5e-2, chunk: int = 1,
                    suffix: bool = True) -> list[ValueResult]:
    """For each request, optimise delta_i so that the model, with ``module``'s output at the
    subject's last token shifted by delta_i in every template, predicts ``target_new``.

    Loss_i = mean NLL(target) + kl_factor * KL(p_orig || p_new) on ``kl_prompt`` at the subject
    + weight_decay * |delta_i| / |v_i|^2, delta_i clamped to clamp_norm_factor * |v_i| (ROME §3.1,
    Eq. 4; MEMIT Eq. 16). Requests can be optimised ``chunk`` at a time in one batched forward:
    each delta_i is its own Adam parameter and only its own rows depend on it, so the result is
    the same as optimising them one by one. On CPU the work is compute-bound and a chunk of 16
    was slower than one at a time (the LM head then runs over the union of the rows' target
    positions), hence the default of 1. A request stops once its target NLL is below ``stop_nll``
    (the reference code stops on the total loss, which on small models never gets below its
    threshold once the clamp is reached) and its rows leave the batch.

    ``suffix=True`` runs each step from the edited block up (:class:`~editpeft.suffix.BlockSuffix`,
    captured during the first, unedited forward): nothing below the edited module depends on the
    deltas, so the steps differ from whole-model steps only in float32 rounding. The first step
    (all deltas zero) must reproduce that forward's logits, else the whole model runs; with
    ``chunk`` > 1 the rows of finished requests then stay in the replayed batch (their deltas
    frozen) instead of leaving it.
    """
    opts = dict(steps=steps, lr=lr, kl_factor=kl_factor, weight_decay=weight_decay,
                clamp_norm_factor=clamp_norm_factor, kl_prompt=kl_prompt, stop_nll=stop_nll, suffix=suffix)
    out: list[ValueResult] = []
    for start in range(0, len(requests), chunk):
        out.extend(_optimize_chunk(model, tokenizer, module_name, list(requests[start:start + chunk]), templates, **opts))
    return out


def _optimize_chunk(model, tokenizer, module_name, requests, templates, *, steps, lr, kl_factor, weight_decay,
                    clamp_norm_factor, kl_prompt, stop_nll, suffix) -> list[ValueResult]:
    module = model.get_submodule(module_name)
    device = next(model.parameters()).device
    texts, spans, targets, owner, kl_row = [], [], [], [], {}

    def add_row(text: str, span, target: str | None, request_index: int) -> None:
        texts.append(text)
        spans.append(span)
        targets.append(target)
        owner.append(request_index)

    for i, r in enumerate(requests):
        for t in templates:
            add_row(*in_template(t, r), r.target_new, i)
        if r.subject:
            kl_row[i] = len(texts)
            add_row(*in_template(kl_prompt, r), None, i)
    full = TargetBatch.build(tokenizer, texts, targets, spans, device=device)
    rw_rows = {i: [j for j, o in enumerate(owner) if o == i and targets[j] is not None] for i in range(len(requests))}

    def positions(rows: Sequence[int]) -> list[int]:
        """Positions whose logits the loss needs: target positions of rewrite rows, KL rows' subject."""
        need: set[int] = set()
        for j in rows:
            if targets[j] is None:
                need.add(full.subject_last[j])
            else:
                need.update(int(p) for p in full.target_positions(j))
        return sorted(need)

    def sub_batch(rows: Sequence[int]) -> TargetBatch:
        idx = torch.tensor(rows, device=device)
        return TargetBatch(full.input_ids[idx], full.attention_mask[idx], [full.prompt_len[j] for j in rows],
                           [full.target_ids[j] for j in rows], [full.subject_last[j] for j in rows])

    # The unedited module output at the subject (v_i, from each request's first template) and the
    # unedited next-token distribution on the KL prompt.
    all_rows = list(range(len(texts)))
    keep = positions(all_rows)
    lookup = torch.tensor(full.subject_last, device=device)
    captured: dict[str, torch.Tensor] = {}

    def record(x, out):
        captured["v"] = as_btd(out, full.input_ids)[torch.arange(len(texts), device=device), lookup].detach()
        return out

    layer = get_arch(model).layer_of(module_name) if suffix else None
    recorder = BlockSuffix.recording(model, layer) if layer is not None else nullcontext([])
    with torch.no_grad(), output_edit(module, record), recorder as recorded:
        logits0 = forward_logits(model, full, torch.tensor(keep, device=device))
    replay = recorded[0] if recorded else None
    col0 = {p: c for c, p in enumerate(keep)}
    v_init = [captured["v"][rw_rows[i][0]].float() for i in range(len(requests))]
    kl_init = {i: F.log_softmax(logits0[j, col0[full.subject_last[j]]].float(), -1) for i, j in kl_row.items()}
    max_norm = [clamp_norm_factor * v.norm() for v in v_init]

    deltas = [torch.zeros(v.shape[0], device=device, requires_grad=True) for v in v_init]
    opt = torch.optim.Adam(deltas, lr=lr)
    results: dict[int, ValueResult] = {}
    last: dict[int, tuple[float, float]] = {}
    active = list(range(len(requests)))

    for step in range(1, steps + 1):
        rows = all_rows if replay is not None else [j for j in all_rows if owner[j] in active]
        batch, keep = sub_batch(rows), positions(rows)
        col = {p: c for c, p in enumerate(keep)}
        local = {j: r for r, j in enumerate(rows)}
        row_owner = torch.tensor([owner[j] for j in rows], device=device)
        # finished requests' deltas are constants now: no gradient, so Adam leaves them as recorded
        stacked = torch.stack([d if i in active else d.detach() for i, d in enumerate(deltas)])

        def shift(x, out):
            add = torch.zeros_like(as_btd(out, batch.input_ids))
            add[torch.arange(len(rows), device=device), torch.tensor(batch.subject_last, device=device)] = \
                stacked[row_owner].to(out.dtype)
            return out + add.reshape(out.shape)

        opt.zero_grad(set_to_none=True)
        with torch.enable_grad(), output_edit(module, shift):
            columns = torch.tensor(keep, device=device)
            logits = replay.logits_at(columns) if replay is not None else None
            if step == 1 and replay is not None and not BlockSuffix.reproduces(logits, logits0):
                logger.debug("the block replay from %s does not reproduce the model; running it whole", module_name)
                replay, logits = None, None
            if logits is None:
                logits = forward_logits(model, batch, columns)
            logps = batch.target_logprobs(logits, keep)
            total = logits.new_zeros((), dtype=torch.float32)
            finished = []
            for i in active:
                nll = torch.stack([-logps[local[j]].mean() for j in rw_rows[i]]).mean()
                loss = nll + weight_decay * deltas[i].norm() / v_init[i].norm() ** 2
                if i in kl_row:
                    j = local[kl_row[i]]
                    kl_new = F.log_softmax(logits[j, col[batch.subject_last[j]]].float(), -1)
                    loss = loss + kl_factor * F.kl_div(kl_new, kl_init[i], log_target=True, reduction="sum")
                loss_val, nll_val = float(loss.detach()), float(nll.detach())
                if not math.isfinite(loss_val):
                    r = requests[i]
                    raise EditOptimizationError(
                        f"the value optimisation for {r.prompt!r} -> {r.target_new!r} diverged (loss={loss_val}) "
                        f"at step {step}; the model was left unchanged. Lower the learning rate.")
                last[i] = (loss_val, nll_val)
                if nll_val < stop_nll:
                    finished.append(i)
                    results[i] = ValueResult(deltas[i].detach().clone(), float(v_init[i].norm()), loss_val, nll_val,
                                             step)
                else:
                    total = total + loss
            logger.debug("step %d: %d active, total loss %.4f", step, len(active), float(total.detach()))
            active = [i for i in active if i not in finished]
            if not active:
                break
            total.backward()
        opt.step()
        with torch.no_grad():
            for i in active:
                norm = deltas[i].norm()
                if norm > max_norm[i]:
                    deltas[i].mul_(max_norm[i] / norm)
    for i in active:
        loss_val, nll_val = last[i]
        results[i] = ValueResult(deltas[i].detach(), float(v_init[i].norm()), loss_val, nll_val, steps)
    for i, r in enumerate(requests):
        if not torch.isfinite(results[i].delta).all():
            raise EditOptimizationError(f"the value optimisation for {r.prompt!r} produced non-finite "
                                        "values; the model was left unchanged. Lower the learning rate.")
    return [results[i] for i in range(len(requests))]
