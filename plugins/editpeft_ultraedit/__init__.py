"""UltraEdit — training-, subject- and memory-free lifelong editing.

Gu, Huang, Gu, Zhang. "UltraEdit: Training-, Subject-, and Memory-Free Lifelong Editing in Large
Language Models", arXiv:2505.14679 (2025; TMLR 2026). Reference code: github.com/XiaojieGu/UltraEdit.

One editing *turn* (one ``add_edit`` call, ``n`` requests) changes the edited linear modules (by
default the MLP output projections of ``layers``) in closed form, from one forward/backward pass:

1. **Editing features** (§3, "editing feature"): teacher-force each request's prompt and new target;
   at every position that predicts a target token (``token="ans"``; ``"all"``: every position up to
   the last target token) take the module's input ``k`` (the hidden state, no subject needed) and the
   gradient ``g = ∂L/∂y`` of the request's mean target NLL at the module's output, and form
   z = [k ‖ g] ∈ R^(d_in + d_out)                                                      (U1)
2. **Lifelong normalisation** (§3, "lifelong normalization"): running per-feature statistics over
   every turn so far, updated with this turn's m feature rows *before* they are used (Chan's
   parallel update of count N, mean μ and summed squared deviation s²):
   δ = z̄ − μ,  μ ← μ + m δ / (N + m),  s² ← s² + Σᵢ (zᵢ − z̄)² + N m δ² / (N + m),  N ← N + m   (U2)
   σ = sqrt(s² / (N − 1)),  ẑ = (z − μ) / (σ + ε)  (ε = float32 eps),  ẑ = [k̂ ‖ ĝ]          (U3)
3. **Target values**: the output change one gradient step of rate η would make for that token,
   in the normalised space:  vᵢ = −η ‖k̂ᵢ‖² ĝᵢ                                              (U4)
4. **Closed-form update** (ridge least squares on the raw keys K (m × d_in), values V (m × d_out)):
   ΔWᵀ = argmin ‖K ΔWᵀ − V‖² + λ‖ΔW‖² = (KᵀK + λI)⁻¹ KᵀV = Kᵀ (KKᵀ + λI)⁻¹ V            (U5)
   stored exactly as the low-rank pair ``up = Vᵀ`` (d_out × m), ``down = Kᵀ (KKᵀ + λI)⁻¹`` (d_in × m),
   so the module's output gains ``(x @ down) @ up.T`` (:class:`editpeft.attach.LowRankDelta`).

(U1)–(U5) are this module's labels for the paper's method section and the reference code's
``ULTRAEDIT.predict_param_shifts``/``RunningMeanStd``; the paper states them in its §3 (its own
equation numbers differ between the arXiv versions). Paper defaults (reference
``config/editor/ultraedit.yaml``): η = 1e-6, λ = 1 (the identity in the solve), ``token: ans``.

**Sequential state.** The adapter keeps, per edited module, ``<module>.norm_count`` (N),
``<module>.norm_mean`` (μ) and ``<module>.norm_m2`` (s²) in float64; ``model.add_edit("ultraedit",
batch, name=..., append=True)`` computes the next turn on the model carrying the adapter (as the
reference edits its model in place), continues the statistics and joins the factors — once they would
hold more numbers than the weight matrix (rank > out·in/(out+in), ~420 feature rows for SmolLM2's
``down_proj``), as one dense change per module, so a long stream's adapter and its cost per token stop
growing (:func:`editpeft.deltas.add_changes`). A saved, loaded or Hub-downloaded adapter continues
exactly where it stopped.

Deliberate differences from the reference code (see also ``cards/ultraedit/llama.yaml``):
- one normaliser per edited module; the reference shares one per weight *shape* (a leftover of the
  shape-shared hyper-networks of MALMEN/RLEdit it builds on), so two ``down_proj`` layers mix stats;
- a turn's loss is the sum of each request's mean target NLL (each edit's own loss, independent of
  how many requests share the turn); the reference takes the token mean over chunks of its data
  loader's batch. Normalisation removes any factor common to all tokens, not a per-request one;
- the batch's squared deviations are summed exactly (population variance); the reference adds
  ``m · var_unbiased``, which is NaN for a one-token turn.

A first turn with a single target token has no spread to normalise by (every ẑ would be 0 and the
edit empty): it is refused with :class:`~editpeft.errors.EditOptimizationError`; edit several facts
together (the paper edits 100 per turn), use ``token="all"``, or append to an adapter that has seen
more tokens.

Example:
    >>> model.add_edit("ultraedit", batch_1, name="lifelong")                  # doctest: +SKIP
    >>> model.add_edit("ultraedit", batch_2, name="lifelong", append=True)     # doctest: +SKIP
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Mapping, Sequence

import torch

import editpeft
from editpeft import EditRequest
from editpeft.adapters import CarriedStateDeltaAdapter
from editpeft.arch import linear_dims
from editpeft.attach import LowRankDelta, WeightChange
from editpeft.errors import AdapterFormatError, ConfigError, EditOptimizationError
from editpeft.gradedit import edited_modules, gradient_factors, loss_token_mask, target_token_mask
from editpeft.mass_edit import join_deltas
from editpeft.method import MethodConfig, check
from editpeft.tokens import TargetBatch

logger = logging.getLogger(__name__)

#: ε of (U3): float32's machine epsilon, as the reference normaliser
EPS = float(torch.finfo(torch.float32).eps)
TOKENS = ("ans", "all")


@dataclass
class UltraEditConfig(MethodConfig):
    layers: list = field(default_factory=lambda: [27, 28], metadata={
        "help": "decoder blocks whose modules are edited (the reference edits the last blocks' down_proj "
                "on Mistral-7B: 29, 30 of 32)"})
    modules: list = field(default_factory=list, metadata={
        "help": "module paths inside each block, e.g. ['mlp.down_proj'] or ['mlp.gate_proj', 'mlp.up_proj']; "
                "empty: the block's MLP output projection"})
    lr: float = field(default=1e-6, metadata={
        "help": "η of the pseudo-values v = -η |k̂|² ĝ (U4); the paper's 1e-6"})
    ridge: float = field(default=1.0, metadata={
        "help": "λ of the closed-form solve (KᵀK + λI)⁻¹KᵀV (U5); the paper's 1 (identity)"})
    token: str = field(default="ans", metadata={
        "help": "positions whose features are used: 'ans' (those predicting target tokens, the paper's) or "
                "'all' (every position up to the last target token)"})

    layer_fields = ("layers",)

    def validate(self) -> None:
        check(isinstance(self.layers, list) and self.layers
              and all(isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in self.layers),
              f"layers must be a non-empty list of non-negative ints, got {self.layers!r}")
        check(len(set(self.layers)) == len(self.layers), f"layers must be distinct, got {self.layers!r}")
        check(isinstance(self.modules, list) and all(isinstance(m, str) and m for m in self.modules),
              f"modules must be a list of module paths such as 'mlp.down_proj', got {self.modules!r}")
        check(self.lr > 0, f"lr must be > 0, got {self.lr}")
        check(self.ridge > 0, f"ridge must be > 0 (the solve needs KᵀK + λI invertible), got {self.ridge}")
        check(self.token in TOKENS, f"token must be one of {TOKENS}, got {self.token!r}")


@dataclass(frozen=True)
class RunningStats:
    """Lifelong normalisation state of one module (U2): count N, mean μ and summed squared deviations
    s² of the features z = [k ‖ g], float64 on the CPU."""

    count: torch.Tensor   # () float64
    mean: torch.Tensor    # (d_in + d_out,)
    m2: torch.Tensor      # (d_in + d_out,)

    @classmethod
    def empty(cls, dim: int) -> "RunningStats":
        zeros = torch.zeros(dim, dtype=torch.float64)
        return cls(torch.zeros((), dtype=torch.float64), zeros, zeros.clone())

    def updated(self, z: torch.Tensor) -> "RunningStats":
        """The statistics after the rows of ``z`` (m × D): (U2), a new object."""
        z = z.double().cpu()
        m = z.shape[0]
        batch_mean = z.mean(0)
        batch_m2 = ((z - batch_mean) ** 2).sum(0)
        n = self.count
        total = n + m
        delta = batch_mean - self.mean
        return RunningStats(total, self.mean + delta * (m / total), self.m2 + batch_m2 + delta ** 2 * (n * m / total))

    def normalise(self, z: torch.Tensor) -> torch.Tensor:
        """ẑ = (z − μ) / (σ + ε) (U3), float64."""
        std = (self.m2 / (self.count - 1)).sqrt() if float(self.count) > 1 else torch.zeros_like(self.m2)
        return (z.double().cpu() - self.mean) / (std + EPS)

    def tensors(self, prefix: str) -> dict[str, torch.Tensor]:
        return {f"{prefix}.norm_count": self.count.detach().clone().contiguous(),
                f"{prefix}.norm_mean": self.mean.detach().contiguous(),
                f"{prefix}.norm_m2": self.m2.detach().contiguous()}


def ridge_factors(keys: torch.Tensor, values: torch.Tensor, ridge: float) -> LowRankDelta:
    """(U5) as factors: ``up = Vᵀ`` (out × m), ``down = Kᵀ (KKᵀ + λI)⁻¹`` (in × m), solved in float64
    (m × m system; equal to (KᵀK + λI)⁻¹Kᵀ by the push-through identity)."""
    k = keys.double()
    gram = k @ k.T + ridge * torch.eye(k.shape[0], dtype=k.dtype, device=k.device)
    down = torch.linalg.solve(gram, k).T                      # (KKᵀ + λI)⁻¹ is symmetric
    up = values.double().T
    if not (torch.isfinite(down).all() and torch.isfinite(up).all()):
        raise EditOptimizationError("UltraEdit's closed-form update is not finite (non-finite hidden states or "
                                    "gradients); the model was left unchanged. Lower lr or raise ridge.")
    return LowRankDelta(up.float().cpu().contiguous(), down.float().cpu().contiguous())


class LifelongNormAdapter(CarriedStateDeltaAdapter):
    """Low-rank weight deltas plus UltraEdit's running statistics per module (``<module>.norm_count``,
    ``.norm_mean``, ``.norm_m2``), the state that lets ``append=True`` continue after save/load."""

    carried_what = "running statistics"

    @property
    def stats(self) -> dict[str, RunningStats]:
        return self.carried

    @classmethod
    def carried_tensors(cls, target: str, value: RunningStats) -> dict[str, torch.Tensor]:
        return value.tensors(target)

    @classmethod
    def read_carried(cls, target: str, delta: WeightChange, tensors: Mapping[str, torch.Tensor]) -> RunningStats:
        dim = sum(delta.shape())
        count, mean, m2 = (tensors.get(f"{target}.norm_{k}") for k in ("count", "mean", "m2"))
        ok = (isinstance(count, torch.Tensor) and count.ndim == 0 and count.dtype == torch.float64
              and bool(torch.isfinite(count)) and float(count) >= 1 and float(count) == int(count)
              and all(isinstance(t, torch.Tensor) and t.shape == (dim,) and t.dtype == torch.float64
                      and bool(torch.isfinite(t).all()) for t in (mean, m2))
              and bool((m2 >= 0).all()))
        if not ok:
            raise AdapterFormatError(
                f"the running statistics of {target!r} ({target}.norm_count/.norm_mean/.norm_m2) are missing or "
                f"malformed (expected a float64 count >= 1 and finite float64 vectors of {dim}, m2 >= 0)")
        return RunningStats(count, mean, m2)


class UltraEdit(editpeft.EditMethod):
    name = "ultraedit"
    kind = "weight_delta"
    Config = UltraEditConfig
    adapter_class = LifelongNormAdapter

    def targets(self, model, config: UltraEditConfig) -> list[str]:
        return edited_modules(model, config.layers, config.modules)

    def compute(self, model, tokenizer, requests: Sequence[EditRequest], config: UltraEditConfig) -> LifelongNormAdapter:
        return self._turn(model, tokenizer, requests, config, prior=None)

    def extend(self, adapter: LifelongNormAdapter, model, tokenizer, requests: Sequence[EditRequest],
               config: UltraEditConfig) -> LifelongNormAdapter:
        """The next turn, computed on the model carrying ``adapter``, continuing its statistics."""
        return self._turn(model, tokenizer, requests, config, prior=adapter)

    def _turn(self, model, tokenizer, requests, config: UltraEditConfig,
              prior: LifelongNormAdapter | None) -> LifelongNormAdapter:
        targets = self.targets(model, config)
        if prior is not None and set(targets) != set(prior.stats):
            raise ConfigError(f"this adapter edits {sorted(prior.stats)}; appending with layers/modules that edit "
                              f"{sorted(targets)} would start new statistics. Append with the adapter's settings")
        batch = TargetBatch.for_model(model, tokenizer, [r.prompt for r in requests], [r.target_new for r in requests])
        mask = target_token_mask(batch) if config.token == "ans" else loss_token_mask(batch)
        factors = gradient_factors(model, batch, targets, mask=mask)                     # (U1)
        deltas, stats = {}, {}
        for target in targets:
            keys, grads = factors.u[target], factors.delta[target]                       # (m, in), (m, out)
            d_in, d_out = linear_dims(model.get_submodule(target))
            before = prior.stats[target] if prior is not None else RunningStats.empty(d_in + d_out)
            z = torch.cat([keys, grads], -1)
            if not torch.isfinite(z).all():
                raise EditOptimizationError(f"non-finite hidden states or gradients at {target!r}; the model was "
                                            "left unchanged")
            after = before.updated(z)                                                    # (U2)
            if float(after.count) < 2:
                raise EditOptimizationError(
                    "UltraEdit normalises the editing features by their running spread, and this first batch has a "
                    "single target token: there is no spread and the edit would be empty. Edit several facts in one "
                    "call (the paper edits 100 per turn), use token='all', or append to an adapter with statistics. "
                    "The model was left unchanged.")
            z_hat = after.normalise(z)                                                   # (U3)
            k_hat, g_hat = z_hat[:, :d_in], z_hat[:, d_in:]
            values = -config.lr * (k_hat * k_hat).sum(-1, keepdim=True) * g_hat          # (U4)
            deltas[target] = ridge_factors(keys.double().cpu(), values, config.ridge)    # (U5)
            stats[target] = after
            logger.info("%s: %d feature rows (N=%d), mean |v| %.3g", target, z.shape[0], int(after.count),
                        float(values.norm(dim=1).mean()))
        common = dict(method=self.name, hparams=config.to_dict())
        if prior is None:
            return LifelongNormAdapter(deltas, stats, requests=list(requests), **common)
        return LifelongNormAdapter(join_deltas(prior.deltas, deltas), stats,
                                   requests=prior.requests + list(requests), **common)
