"""Gradient-conditioned editors' shared machinery (MEND, KE): rank-one gradient factors, per-edit
low-rank deltas in one batched forward, and the edit / locality losses they are trained with.

For a Linear layer ``y = x Wᵀ`` the gradient of a loss over a sequence is a sum of rank-one terms,
one per token (Mitchell et al. 2022, "Fast Model Editing at Scale", §3.1, eq. 1):

    ∇_W L = Σ_i δ_i u_iᵀ,   u_i = the layer's input at token i,   δ_i = ∂L/∂y_i

(a GPT-2 ``Conv1D`` stores Wᵀ, so its gradient is the transpose). :func:`gradient_factors`
captures u and δ at several modules in one forward/backward pass. Each batch row is one edit's
sequence and the loss is the *sum* of the rows' mean target NLLs, so row b's δ is exactly the
gradient of edit b's own loss: a batch of independent edits costs one pass. A hyper-network then
maps the factors to new ones, and an edit is the low-rank ``ΔW = Σ_i δ̃_i ũ_iᵀ``
(:class:`~editpeft.deltas.LowRankDelta`, ``up = δ̃ᵀ``, ``down = ũᵀ``).

While an editor is trained, :func:`routed_deltas` applies every edit of a batch at once: rows of
the probe batch carry the id of the edit they test and see only that edit's columns of the
factors. :class:`EditProbe` builds those rows (the edit prompt and its paraphrases with the new
target; locality prompts) and scores them: the edit NLL ``L_e`` and the locality KL ``L_loc``.

Example:
    >>> batch = TargetBatch.build(tok, ["The Eiffel Tower is in"], [" Rome"])     # doctest: +SKIP
    >>> f = gradient_factors(model, batch, ["model.layers.29.mlp.down_proj"])       # doctest: +SKIP
    >>> f.delta["model.layers.29.mlp.down_proj"].T @ f.u["model.layers.29.mlp.down_proj"]  # == ∇W  # doctest: +SKIP
"""
from __future__ import annotations

from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from typing import Iterator, Mapping, Sequence

import torch
import torch.nn.functional as F

from .arch import get_arch, linear_dims
from .errors import ConfigError, InvalidRequestError
from .probe import output_edit
from .request import EditRequest
from .tokens import TargetBatch, model_device


def edited_modules(model, layers: Sequence[int], modules: Sequence[str]) -> list[str]:
    """Full names of the modules edited: ``modules`` (or the MLP output projection) of each block."""
    arch = get_arch(model)
    n = arch.num_layers
    names = []
    for layer in layers:
        index = arch.check_layer(layer + n if layer < 0 else layer)
        if modules:
            names += [f"{arch.layer_name(index)}.{m}" for m in modules]
        else:
            names.append(arch.mlp_out_name(index))
    for name in names:
        linear_dims(arch.module(name))     # a Linear/Conv1D, or a clear error
    if len(set(names)) != len(names):
        raise ConfigError(f"layers {list(layers)} name the same block twice; list each block once")
    return names


@dataclass
class GradFactors:
    """Rank-one factors of the gradient at each module: ``u[name]`` (n, d_in), ``delta[name]`` (n, d_out),
    one row per token that can reach the loss; ``edit`` (n,) is the batch row (edit) of each token;
    ``loss`` the per-row NLLs (B,) before the edit."""

    u: dict[str, torch.Tensor]
    delta: dict[str, torch.Tensor]
    edit: torch.Tensor
    loss: torch.Tensor


def loss_token_mask(batch: TargetBatch) -> torch.Tensor:
    """(B, T) bool: the positions of a causal batch whose outputs can reach a target NLL (real tokens
    before the last target token; later positions have δ = 0 and would only add noise)."""
    B, T = batch.input_ids.shape
    pos = torch.arange(T, device=batch.input_ids.device)[None, :]
    last = torch.tensor([p + len(t) - 1 for p, t in zip(batch.prompt_len, batch.target_ids)],
                        device=batch.input_ids.device)[:, None]
    return batch.attention_mask.bool() & (pos < last)


def target_token_mask(batch: TargetBatch) -> torch.Tensor:
    """(B, T) bool: only the positions of a causal batch whose logits predict a target token (the last
    prompt token and every target token but the last) — the "answer" positions of UltraEdit's cache."""
    mask = torch.zeros(batch.input_ids.shape, dtype=torch.bool, device=batch.input_ids.device)
    where = batch.target_where().to(mask.device)
    mask[where[:, 0], where[:, 1]] = True
    return mask


def _btd(t: torch.Tensor, B: int, T: int) -> torch.Tensor:
    """A module's input/output as (B, T, d) (OPT's MLP works on flattened (B*T, d))."""
    return t.reshape(B, T, t.shape[-1])


def gradient_factors(model, batch: TargetBatch, modules: Sequence[str],
                     mask: torch.Tensor | None = None) -> GradFactors:
    """u and δ at each of ``modules`` for the summed per-row target NLL of ``batch`` (one forward and
    one backward pass; the model's parameters get no gradient). See the module docstring.

    ``mask`` (B, T) bool selects the token positions returned (default :func:`loss_token_mask`;
    :func:`target_token_mask` keeps only the positions that predict target tokens)."""
    if any(not t for t in batch.target_ids):
        raise InvalidRequestError("every row needs a non-empty target to take its gradient")
    B, T = batch.input_ids.shape
    xs: dict[str, torch.Tensor] = {}
    zs: dict[str, torch.Tensor] = {}

    def hook(name):
        def fn(module, args, out):
            xs[name] = args[0].detach()
            zs[name] = torch.zeros_like(out, requires_grad=True)
            return out + zs[name]       # the graph above stays connected; ∂L/∂z = ∂L/∂out
        return fn

    with ExitStack() as stack, torch.enable_grad():
        for name in modules:
            handle = model.get_submodule(name).register_forward_hook(hook(name))
            stack.callback(handle.remove)
        logits = model(**batch.model_inputs()).logits
        lps = batch.target_logprobs(logits)
        per_row = torch.stack([-lp.mean() for lp in lps])
        grads = torch.autograd.grad(per_row.sum(), [zs[n] for n in modules], allow_unused=True)
    mask = loss_token_mask(batch) if mask is None else mask.to(device=batch.input_ids.device, dtype=torch.bool)
    rows = torch.arange(B, device=mask.device)[:, None].expand(B, T)[mask]
    u, delta = {}, {}
    for name, g in zip(modules, grads):
        g = torch.zeros_like(zs[name]) if g is None else g
        u[name] = _btd(xs[name], B, T)[mask]
        delta[name] = _btd(g, B, T)[mask]
    return GradFactors(u, delta, rows, per_row.detach())


@contextmanager
def routed_deltas(model, factors: Mapping[str, tuple[torch.Tensor, torch.Tensor]], col_edit: torch.Tensor,
                  row_edit: torch.Tensor | None) -> Iterator[None]:
    """Add ``up @ downᵀ`` to each named module's output, row b using only the columns whose
    ``col_edit`` equals ``row_edit[b]`` (every column when ``row_edit`` is None): many edits, each
    tested on its own rows, in one forward. ``factors[name] = (up (d_out, n), down (d_in, n))``."""
    def fn(up, down):
        def edit(x, out):
            B = row_edit.shape[0] if row_edit is not None else None
            h = x @ down                                   # (..., n)
            if row_edit is not None:
                keep = (col_edit[None, :] == row_edit[:, None]).to(h.dtype)   # (B, n)
                h = (h.reshape(B, -1, h.shape[-1]) * keep[:, None, :]).reshape(h.shape)
            return out + h @ up.T
        return edit

    with ExitStack() as stack:
        for name, (up, down) in factors.items():
            stack.enter_context(output_edit(model.get_submodule(name), fn(up, down)))
        yield


def locality_kl(base_logits: torch.Tensor, edited_logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over masked positions of KL(p_base ‖ p_edited) (MEND's L_loc, KE's constraint C)."""
    base = F.log_softmax(base_logits[mask].float(), -1)
    edited = F.log_softmax(edited_logits[mask].float(), -1)
    return (base.exp() * (base - edited)).sum(-1).mean()


class EditProbe:
    """The rows an edit is trained and validated on, for a batch of independent edits.

    Edit rows: each request's prompt and paraphrases, teacher-forced on its new target (edit id =
    the request's index). Locality rows: each request's locality prompts, or, when it has none,
    the other requests' prompts of the batch (inputs the edit should not concern, as KE's O_x);
    their pre-edit logits are computed once here.

    Example:
        >>> probe = EditProbe(model, tok, requests)                              # doctest: +SKIP
        >>> with routed_deltas(model, factors, cols, probe.edit_rows): losses = probe.score(model)  # doctest: +SKIP
    """

    def __init__(self, model, tokenizer, requests: Sequence[EditRequest], *, max_locality: int = 2):
        device = model_device(model)
        prompts, targets, ids = [], [], []
        for b, r in enumerate(requests):
            for p in (r.prompt, *r.paraphrases):
                prompts.append(p)
                targets.append(r.target_new)
                ids.append(b)
        self.edit = TargetBatch.build(tokenizer, prompts, targets, device=device)
        self.edit_ids = torch.tensor(ids, device=device)
        loc, loc_ids = [], []
        for b, r in enumerate(requests):
            own = list(r.locality) or [o.prompt for j, o in enumerate(requests) if j != b]
            loc += own[:max_locality]
            loc_ids += [b] * len(own[:max_locality])
        self.loc = TargetBatch.build(tokenizer, loc, device=device) if loc else None
        self.loc_ids = torch.tensor(loc_ids, device=device, dtype=torch.long)
        self.base_loc_logits = None
        if self.loc is not None:
            with torch.no_grad():
                self.base_loc_logits = model(**self.loc.model_inputs()).logits.detach()

    def score(self, model, apply) -> dict[str, torch.Tensor]:
        """``apply(row_edit)`` is a context manager applying the edits routed by row; returns the edit
        NLL ``edit_nll`` (L_e), its token accuracy ``edit_acc``, the locality KL ``loc_kl`` (L_loc)
        and the fraction of locality positions whose top-1 token is kept ``loc_top1``."""
        with apply(self.edit_ids):
            logits = model(**self.edit.model_inputs()).logits
        lps = self.edit.target_logprobs(logits)
        out = {"edit_nll": torch.stack([-lp.mean() for lp in lps]).mean()}
        with torch.no_grad():
            hits = [float((logits[i, self.edit.target_positions(i)].argmax(-1).cpu()
                           == torch.tensor(t)).float().mean()) for i, t in enumerate(self.edit.target_ids)]
        out["edit_acc"] = torch.tensor(sum(hits) / len(hits))
        if self.loc is None:
            out["loc_kl"] = logits.new_zeros(())
            out["loc_top1"] = torch.tensor(1.0)
            return out
        with apply(self.loc_ids):
            loc_logits = model(**self.loc.model_inputs()).logits
        mask = self.loc.attention_mask.bool()
        out["loc_kl"] = locality_kl(self.base_loc_logits, loc_logits, mask)
        with torch.no_grad():
            out["loc_top1"] = (loc_logits[mask].argmax(-1) == self.base_loc_logits[mask].argmax(-1)).float().mean()
        return out
