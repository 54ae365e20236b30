"""What a fine-tuning edit stores and how exactly it leaves as a peft LoRA.

    python benchmarks/finetune_export.py --n 10

For the first N known CounterFact cases and each of ft-l, ft-m, lora (card settings): adapter
bytes per edit, the numerical rank of every changed module's delta, and the greatest logit
difference on the edit's prompt between the editpeft edit and the exported LoRA loaded by
``peft.PeftModel`` into a fresh copy of the base model (exact export; for the dense deltas also
the rank-``--max-rank`` truncation error that editpeft measures itself).
"""
from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path

import torch
from common import COUNTERFACT, editable_default_model, print_table

import editpeft
from editpeft.evaluation import load_cases
from editpeft.evaluation.runner import known_mask
from editpeft.testing import logits_of


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=10)
    ap.add_argument("--methods", nargs="*", default=["ft-l", "ft-m", "lora"])
    ap.add_argument("--max-rank", type=int, default=8)
    args = ap.parse_args()
    from peft import PeftModel
    model, tok = editable_default_model()
    base, _ = editpeft.load_default_model()
    cases = load_cases(COUNTERFACT)
    known = [c for c, k in zip(cases[:400], known_mask(model, tok, cases[:400])) if k][: args.n]
    rows = []
    for method in args.methods:
        sizes, ranks, errors, truncated = [], [], [], []
        for case in known:
            request = case.requests[0]
            adapter = model.add_edit(method, request, name="e")
            prompts = [request.prompt] + [p.prompt for p in case.generalization[:1]]
            sizes.append(adapter.num_bytes())
            ranks += [d.rank for d in adapter.deltas.values()]
            with tempfile.TemporaryDirectory() as tmp:
                adapter.to_peft_lora(Path(tmp) / "exact")
                peft_model = PeftModel.from_pretrained(base, Path(tmp) / "exact")
                errors.append(float((logits_of(peft_model, tok, prompts) - logits_of(model, tok, prompts)).abs().max()))
                base = peft_model.unload()
                if method != "lora":
                    adapter.to_peft_lora(Path(tmp) / "cut", max_rank=args.max_rank)
                    cfg = json.loads((Path(tmp) / "cut" / "adapter_config.json").read_text())
                    truncated.append(cfg["editpeft_truncation"]["e"]["max_logit_error"])
            model.remove_edit("e")
        rows.append({"method": method, "edits": len(known), "bytes_per_edit": int(statistics.median(sizes)),
                     "rank_median": statistics.median(ranks), "rank_max": max(ranks),
                     "export_logit_err_max": f"{max(errors):.2e}",
                     f"rank{args.max_rank}_logit_err_median": f"{statistics.median(truncated):.3g}" if truncated else "-"})
    print_table(rows, list(rows[0]))


if __name__ == "__main__":
    torch.manual_seed(0)
    main()
