"""Replaying only the top of a causal LM: logits after a change to the last block's MLP output.

A method that trains a change Δ added to the MLP output of the *last* block (T-Patcher's patch
neurons, by default) needs, at every optimisation step, the logits

    logits(Δ) = head(final_norm(h + m + Δ))

where h + m is the block's output before the change (a plain residual: attention branch h plus
MLP output m). Nothing below that sum depends on Δ, so one forward captures the block's output
y₀ = h + m and the MLP's input x at the positions that matter, and each step costs the final
norm and the output projection of those positions only — instead of the whole model.

That identity holds for families whose last block adds its MLP output to the residual and whose
head is ``lm_head(final_norm(·))`` (with Gemma 2's logit soft-capping when configured); it does not
hold behind a post-FFN norm (Gemma 2/3 normalise ``m + Δ`` before the sum) or when another
adapter's hook rewrites the block's output. So :meth:`LastBlockReplay.capture` *checks* it on the
actual inputs — the replayed logits with a random Δ must equal the model's own — and returns None
when it does not hold; callers then run the full model.

Example:
    >>> replay = LastBlockReplay.capture(model, site, batch.model_inputs(), positions)  # doctest: +SKIP
    >>> logits = replay.logits(patch(replay.inputs)) if replay else full_forward()       # doctest: +SKIP
"""
from __future__ import annotations

import logging
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator, Mapping

import torch
from torch import nn

from .arch import get_arch, site_tensor

logger = logging.getLogger(__name__)

#: Names of the final norm on the module holding the blocks, across the supported families.
FINAL_NORMS = ("norm", "ln_f", "final_layer_norm")

#: The replay must reproduce the model's logits to this fraction of their largest magnitude: the
#: two paths differ only in the order of one float32 addition (h + (m + Δ) against (h + m) + Δ),
#: whose rounding is ~1e-7 of the hidden state's scale; 1e-4 leaves room for the norm and head.
REPLAY_RTOL = 1e-4


@dataclass
class OutputHead:
    """``logits = softcap(lm_head(project_out(final_norm(hidden))))`` of a causal LM."""

    norm: nn.Module
    lm_head: nn.Module
    project_out: nn.Module | None = None
    softcap: float | None = None

    def __call__(self, hidden: torch.Tensor) -> torch.Tensor:
        h = self.norm(hidden)
        if self.project_out is not None:
            h = self.project_out(h)
        logits = self.lm_head(h)
        if self.softcap:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits

    @classmethod
    def of(cls, model: nn.Module) -> "OutputHead | None":
        """The head of ``model`` (a supported causal LM), or None when it is not of this form."""
        arch = get_arch(model)
        if arch.topology != "causal":
            return None
        body = model.get_submodule(arch.stack().layers.rsplit(".", 1)[0])
        norm = next((getattr(body, n) for n in FINAL_NORMS if isinstance(getattr(body, n, None), nn.Module)), None)
        lm_head = model.get_output_embeddings()
        if norm is None or lm_head is None:
            return None
        return cls(norm, lm_head, getattr(body, "project_out", None),
                   getattr(model.config, "final_logit_softcapping", None))


@dataclass
class LastBlockReplay:
    """The captured top of one forward: the MLP's input ``inputs`` and the last block's output
    ``outputs`` at ``positions`` (row-major over the batch), and the head to replay them."""

    inputs: torch.Tensor
    outputs: torch.Tensor
    head: OutputHead

    def logits(self, delta: torch.Tensor) -> torch.Tensor:
        """Logits at the captured positions with ``delta`` added to the MLP output there."""
        return self.head(self.outputs + delta.to(self.outputs.dtype))

    @classmethod
    def capture(cls, model: nn.Module, read: str, write: str, inputs: Mapping[str, torch.Tensor],
                positions: torch.Tensor) -> "LastBlockReplay | None":
        """Capture at ``positions`` ((row, position) pairs, shape (n, 2)) the input of module ``read``
        and the last block's output, with the MLP output written by module ``write``; None unless
        ``write`` is in the last block and the replay reproduces the model's logits (checked with
        a random change as large as the block's output)."""
        arch = get_arch(model)
        head = OutputHead.of(model)
        last = arch.layer_name(arch.num_layers - 1)
        if head is None or not write.startswith(last + "."):
            return None
        rows, cols = positions[:, 0], positions[:, 1]
        x, y0, logits0 = _forward(model, read, write, last, inputs)
        shape = tuple(inputs["input_ids"].shape)
        y0, x = _as_btd(y0, shape)[rows, cols], _as_btd(x, shape)[rows, cols]
        delta = torch.randn(y0.shape, generator=torch.Generator().manual_seed(0)).to(y0) * y0.std()
        _, _, logits1 = _forward(model, read, write, last, inputs, add=(rows, cols, delta))
        replay = cls(x.detach(), y0.detach(), head)
        with torch.no_grad():
            ok = all(_close(replay.logits(d), want[rows, cols])
                     for d, want in ((torch.zeros_like(delta), logits0), (delta, logits1)))
        if not ok:
            logger.debug("last-block replay does not reproduce the logits at %s; running the full model", write)
            return None
        return replay


@dataclass
class BlockSuffix:
    """Blocks ``start``..last of a causal LM and the head, replayed from one captured forward.

    The hidden state entering block ``start`` and the arguments every later block was called with
    (attention masks, rotary tables, position ids) are captured once; :meth:`logits` then runs only
    those blocks — with whatever hooks are registered on them at that time, e.g. a change being
    trained — and the head, at the positions asked. Exact when the layers below ``start`` are
    unchanged: :meth:`capture` checks it with one extra replay; :meth:`recording` captures during
    a forward the caller runs anyway and leaves the check to the caller (compare the first
    replay, made before anything changed, with that forward's logits: :meth:`reproduces`).
    """

    blocks: list[nn.Module]
    calls: list[tuple[tuple, dict]]
    hidden: torch.Tensor
    head: OutputHead

    def last_hidden(self) -> torch.Tensor:
        """The last block's output (batch × time × width) replayed from the captured input."""
        h = self.hidden
        for block, (args, kwargs) in zip(self.blocks, self.calls):
            h = site_tensor(block(h, *args, **kwargs))
        return h

    def logits(self, positions: torch.Tensor | None = None) -> torch.Tensor:
        """Logits at ``positions`` ((row, position) pairs, shape (n, 2)); all positions if None."""
        h = self.last_hidden()
        if positions is not None:
            h = h[positions[:, 0], positions[:, 1]]
        return self.head(h)

    def logits_at(self, columns: torch.Tensor) -> torch.Tensor:
        """Logits of every row at time steps ``columns`` (batch × len(columns) × vocab), as a
        forward with ``logits_to_keep=columns`` returns them."""
        return self.head(self.last_hidden()[:, columns])

    @staticmethod
    def reproduces(got: torch.Tensor, want: torch.Tensor) -> bool:
        """Whether replayed logits ``got`` equal the model's own ``want`` (to :data:`REPLAY_RTOL`)."""
        return _close(got.detach(), want.detach())

    @classmethod
    @contextmanager
    def recording(cls, model: nn.Module, start: int) -> Iterator[list["BlockSuffix"]]:
        """Capture blocks ``start``.. during the one forward run inside the block; the list it
        yields then holds the suffix, or stays empty when it cannot be replayed (a head that is not
        ``lm_head(final_norm)``, an encoder-decoder, a forward that skipped blocks). Unchecked.

        >>> with BlockSuffix.recording(model, 3) as got:                    # doctest: +SKIP
        ...     want = model(**inputs).logits
        >>> suffix = got[0] if got else None                                 # doctest: +SKIP
        """
        arch = get_arch(model)
        head = OutputHead.of(model)
        found: list[BlockSuffix] = []
        if head is None:
            yield found
            return
        blocks = list(arch.layers())[arch.check_layer(start):]
        calls: list[tuple[tuple, dict]] = []
        first: list[torch.Tensor] = []

        def grab(module, args, kwargs):
            if not first:
                first.append(args[0] if args else kwargs["hidden_states"])
            rest = args[1:] if args else ()
            calls.append((rest, {k: v for k, v in kwargs.items() if k != "hidden_states"}))
        hooks = [b.register_forward_pre_hook(grab, with_kwargs=True) for b in blocks]
        try:
            yield found
        finally:
            for h in hooks:
                h.remove()
        if len(calls) == len(blocks):
            found.append(cls(blocks, calls, first[0].detach(), head))

    @classmethod
    def capture(cls, model: nn.Module, start: int, inputs: Mapping[str, torch.Tensor],
                positions: torch.Tensor) -> "BlockSuffix | None":
        """Capture blocks ``start``.. of one forward on ``inputs``; None unless the replay gives the
        model's logits at ``positions`` (families whose head is not ``lm_head(final_norm)``, or a
        forward that does more between blocks)."""
        with torch.no_grad(), cls.recording(model, start) as got:
            want = model(**inputs, use_cache=False).logits[positions[:, 0], positions[:, 1]]
        if not got:
            return None
        with torch.no_grad():
            if not cls.reproduces(got[0].logits(positions), want):
                logger.debug("block suffix from %d does not reproduce the logits; running the full model", start)
                return None
        return got[0]


def _forward(model, read: str, write: str, last: str, inputs, add=None):
    """One no-grad forward returning (read's input, last block's output, logits); ``add`` =
    (rows, cols, delta) adds delta to ``write``'s output at those positions."""
    seen: dict[str, torch.Tensor] = {}

    def on_write(module, args, out):
        if add is None:
            return None
        rows, cols, delta = add
        out = out.clone()
        _as_btd(out, tuple(inputs["input_ids"].shape))[rows, cols] += delta.to(out.dtype)
        return out

    hooks = [model.get_submodule(read).register_forward_pre_hook(lambda m, a: seen.__setitem__("x", a[0])),
             model.get_submodule(write).register_forward_hook(on_write),
             model.get_submodule(last).register_forward_hook(lambda m, a, o: seen.__setitem__("y", site_tensor(o)))]
    try:
        with torch.no_grad():
            logits = model(**inputs, use_cache=False).logits
    finally:
        for h in hooks:
            h.remove()
    return seen["x"], seen["y"], logits


def _as_btd(t: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    """``t`` as (batch, time, width): some families (OPT) flatten the tokens inside the MLP."""
    return t.view(*shape, t.shape[-1])


def _close(got: torch.Tensor, want: torch.Tensor) -> bool:
    scale = float(want.abs().max()) or 1.0
    return bool(((got.float() - want.float()).abs().max() <= REPLAY_RTOL * scale).item())

