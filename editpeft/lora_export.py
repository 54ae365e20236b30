"""Export weight-delta edits as a standard PEFT LoRA adapter folder.

``adapter_config.json`` + ``adapter_model.safetensors`` in peft's own format, loadable with
``peft.PeftModel.from_pretrained(base, folder)`` where editpeft is not installed, so a
LoRA-serving stack can serve an edit. A delta ``up @ down.T`` becomes ``lora_B = up``,
``lora_A = down.T`` with scaling 1 (``lora_alpha = r`` per module); several edits of one module
are concatenated along the rank, which is exactly their sum.

Example:
    >>> export_peft_lora([model.edits["eiffel"]], "lora/eiffel")            # doctest: +SKIP
    >>> PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), "lora/eiffel")  # doctest: +SKIP
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Sequence

import torch
from safetensors.torch import save_file

from .adapters import EditAdapter, WeightDeltaAdapter
from .card import adapters_facts_table, front_matter
from .errors import EditError

#: Families whose projection modules are transformers' Conv1D (weights stored in × out).
CONV1D_FAMILIES = ("gpt2",)


def export_peft_lora(adapters: Sequence[EditAdapter], out_dir: str | os.PathLike,
                     base_model_name_or_path: str | None = None) -> Path:
    """Write the sum of the given weight-delta adapters as one PEFT LoRA adapter in ``out_dir``."""
    if not adapters:
        raise EditError("nothing to export; pass at least one weight-delta edit")
    for a in adapters:
        if not isinstance(a, WeightDeltaAdapter):
            raise EditError(f"edit {a.name!r} is a {a.kind} adapter ({a.method}); only weight deltas have a LoRA form")
    model_types = {(a.base_model or {}).get("model_type") for a in adapters}
    bases = {(a.base_model or {}).get("name_or_path") for a in adapters}
    if len(model_types) > 1:
        raise EditError(f"these edits were made for different model families ({sorted(map(str, model_types))})")
    ups: dict[str, list[torch.Tensor]] = {}
    downs: dict[str, list[torch.Tensor]] = {}
    for a in adapters:
        for target, delta in a.deltas.items():
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
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / "adapter_model.safetensors"))
    (out / "adapter_config.json").write_text(json.dumps(config, indent=2))
    lines = front_matter("peft", ["lora"])
    lines += ["", "A PEFT LoRA adapter exported from editpeft weight-delta edits:", ""]
    lines += adapters_facts_table(adapters)
    (out / "README.md").write_text("\n".join(lines) + "\n")
    return out
