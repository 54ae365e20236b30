"""Export weight-delta edits as a standard PEFT LoRA adapter folder.

``adapter_config.json`` + ``adapter_model.safetensors`` in peft's own format, loadable with
``peft.PeftModel.from_pretrained(base, folder)`` where editpeft is not installed, so a
LoRA-serving stack can serve an edit. A delta ``up @ down.T`` becomes ``lora_B = up``,
``lora_A = down.T`` with scaling 1 (``lora_alpha = r`` per module); several edits of one module
are concatenated along the rank, which is exactly their sum.

Dense deltas (constrained fine-tuning) are factored by an SVD: exactly (at their numerical rank)
when ``max_rank`` is None or at least that rank, otherwise truncated to ``max_rank``. A truncated
export is measured: the adapter must be attached to its model, and the greatest logit error of the
LoRA form against the dense edit on the adapter's own prompts is written into the exported README
(and returned in ``adapter_config.json``'s ``editpeft_truncation``).

Example:
    >>> export_peft_lora([model.edits["eiffel"]], "lora/eiffel")            # doctest: +SKIP
    >>> PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), "lora/eiffel")  # doctest: +SKIP
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import torch
from safetensors.torch import save_file

from .card import adapters_facts_table, front_matter
from .deltas import DenseDelta, LowRankDelta
from .errors import EditError

if TYPE_CHECKING:  # pragma: no cover
    from .adapters import EditAdapter, WeightDeltaAdapter

#: Families whose projection modules are transformers' Conv1D (weights stored in × out).
CONV1D_FAMILIES = ("gpt2",)


def export_peft_lora(adapters: "Sequence[EditAdapter]", out_dir: str | os.PathLike,
                     base_model_name_or_path: str | None = None, max_rank: int | None = None) -> Path:
    """Write the sum of the given weight-delta adapters as one PEFT LoRA adapter in ``out_dir``.

    ``max_rank`` bounds the rank of a dense delta's factors (see the module docstring)."""
    if not adapters:
        raise EditError("nothing to export; pass at least one weight-delta edit")
    for a in adapters:
        if a.kind != "weight_delta" or not hasattr(a, "deltas"):
            raise EditError(f"edit {a.name!r} is a {a.kind} adapter ({a.method}); only weight deltas have a LoRA form")
    model_types = {(a.base_model or {}).get("model_type") for a in adapters}
    bases = {(a.base_model or {}).get("name_or_path") for a in adapters}
    if len(model_types) > 1:
        raise EditError(f"these edits were made for different model families ({sorted(map(str, model_types))})")
    ups: dict[str, list[torch.Tensor]] = {}
    downs: dict[str, list[torch.Tensor]] = {}
    truncation: dict[str, dict] = {}
    for a in adapters:
        factors = low_rank_form(a, max_rank)
        if any(isinstance(d, DenseDelta) and max_rank is not None and d.rank > max_rank for d in a.deltas.values()):
            truncation[str(a.name)] = {"max_rank": max_rank, "max_logit_error": truncation_error(a, factors)}
        for target, delta in factors.items():
            ups.setdefault(target, []).append(delta.up.detach().float().cpu())
            downs.setdefault(target, []).append(delta.down.detach().float().cpu())
    tensors, ranks = {}, {}
    for target in ups:
        up, down = torch.cat(ups[target], 1), torch.cat(downs[target], 1)     # (out, r), (in, r)
        tensors[f"base_model.model.{target}.lora_B.weight"] = up.contiguous()
        tensors[f"base_model.model.{target}.lora_A.weight"] = down.T.contiguous()
        ranks[target] = up.shape[1]
    r = max(ranks.values())
    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model_name_or_path or next(iter(bases)) or None,
        "r": r, "lora_alpha": r, "rank_pattern": ranks, "alpha_pattern": ranks,
        "target_modules": sorted(ranks), "lora_dropout": 0.0, "bias": "none",
        "fan_in_fan_out": next(iter(model_types)) in CONV1D_FAMILIES,
        "use_rslora": False, "use_dora": False, "init_lora_weights": True, "inference_mode": True,
    }
    if truncation:
        config["editpeft_truncation"] = truncation
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / "adapter_model.safetensors"))
    (out / "adapter_config.json").write_text(json.dumps(config, indent=2))
    lines = front_matter("peft", ["lora"])
    lines += ["", "A PEFT LoRA adapter exported from editpeft weight-delta edits:", ""]
    lines += adapters_facts_table(adapters)
    if truncation:
        lines += [""] + [f"- `{n}`: dense delta truncated to rank {t['max_rank']} by SVD; greatest logit error "
                         f"on its prompts {t['max_logit_error']:.3g}" for n, t in truncation.items()]
    (out / "README.md").write_text("\n".join(lines) + "\n")
    return out


def svd_factors(delta: DenseDelta, max_rank: int | None) -> LowRankDelta:
    """``delta`` as low-rank factors: exact at its numerical rank, or truncated to ``max_rank``."""
    u, s, vh = torch.linalg.svd(delta.weight.double(), full_matrices=False)
    rank = delta.rank if max_rank is None else min(delta.rank, max_rank)
    rank = max(rank, 1)
    root = s[:rank].sqrt()
    dtype = delta.weight.dtype
    return LowRankDelta((u[:, :rank] * root).to(dtype), (vh[:rank].T * root).to(dtype))


def low_rank_form(adapter: "WeightDeltaAdapter", max_rank: int | None) -> dict[str, LowRankDelta]:
    """Every delta of ``adapter`` as low-rank factors (low-rank ones as they are)."""
    out = {}
    for target, delta in adapter.deltas.items():
        if isinstance(delta, LowRankDelta):
            out[target] = delta
        elif isinstance(delta, DenseDelta):
            out[target] = svd_factors(delta, max_rank)
        else:
            raise EditError(f"edit {adapter.name!r} has a {type(delta).__name__} on {target!r}, which has no LoRA form")
    return out


def truncation_error(adapter: "WeightDeltaAdapter", factors: dict[str, LowRankDelta]) -> float:
    """Greatest |logit| difference on the adapter's prompts between the dense edit and ``factors``."""
    from .attach import temporary_deltas
    from .tokens import TargetBatch, model_device
    state = adapter._state
    if state is None or adapter.merged or not adapter.requests:
        raise EditError(f"exporting edit {adapter.name!r} needs a rank-{max(d.rank for d in factors.values())} "
                        "truncation of its dense delta; attach it (unmerged) to its model so that the logit error "
                        "can be measured, or pass max_rank=None for an exact export")
    model = state.model
    batch = TargetBatch.build(state.tokenizer, [r.prompt for r in adapter.requests], device=model_device(model))
    was_active = adapter.active
    try:
        adapter.active = True
        with torch.no_grad():
            dense = model(**batch.model_inputs()).logits
            adapter.active = False
            with temporary_deltas(model, factors):
                approx = model(**batch.model_inputs()).logits
    finally:
        adapter.active = was_active
    mask = batch.attention_mask.bool()
    return float((dense - approx).abs()[mask].max())
