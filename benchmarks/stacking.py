"""Heterogeneous stacking on the embedded model: ROME, GRACE, T-Patcher, WISE and a LoRA edit live on
one model at once, each holding its own known CounterFact facts; every fact is scored with the whole
stack on, and again with only its own adapter on, so the table shows what stacking costs.

    python benchmarks/stacking.py                   # 4 facts per method, the first 20 known cases
    python benchmarks/stacking.py --per-method 8

Prints one row per method (token_em; locality = neighbourhood prompts keeping their top-1) and the
bitwise checks: switching each adapter off equals removing it; removing all restores the base.
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
from common import COUNTERFACT, editable_default_model, print_table

from editpeft.evaluation import CaseScorer, load_cases
from editpeft.evaluation.runner import _select

METHODS = ("rome", "grace", "t-patcher", "wise", "lora")
PROBE = ["The Eiffel Tower is located in the city of", "The mother tongue of Danielle Darrieux is"]


def _mean(scores: list[dict], metric: str) -> float:
    vals = [s[metric]["token_em"] for s in scores if metric in s and "token_em" in s[metric]]
    return sum(vals) / len(vals) if vals else float("nan")


def _logits(model, tok, prompts):
    enc = tok(prompts, return_tensors="pt", padding=True)
    with torch.no_grad():
        return model(**enc).logits[:, -1]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--per-method", type=int, default=4)
    args = ap.parse_args()
    model, tok = editable_default_model()
    tok.padding_side = "left"
    n = args.per_method * len(METHODS)
    cases, _ = _select(model, tok, load_cases(COUNTERFACT), n, True, (0, 1))
    groups = {m: cases[i * args.per_method:(i + 1) * args.per_method] for i, m in enumerate(METHODS)}
    scorer = CaseScorer(model, tok, protocols=["token_em"])
    baselines = {m: scorer.baseline(g) for m, g in groups.items()}
    base = _logits(model, tok, PROBE)
    seconds = {}
    for method, group in groups.items():
        t = time.perf_counter()
        model.add_edit(method, [c.requests[0] for c in group], name=method)
        seconds[method] = (time.perf_counter() - t) / len(group)
    stacked = {m: scorer.score(g, baselines[m]) for m, g in groups.items()}
    alone = {}
    for method, group in groups.items():
        model.set_active_edits([method])
        alone[method] = scorer.score(group, baselines[method])
    model.set_active_edits(list(METHODS))
    full = _logits(model, tok, PROBE)
    checks = []
    with tempfile.TemporaryDirectory() as tmp:
        for m in METHODS:
            model.edits[m].save_pretrained(Path(tmp) / m)
        for m in METHODS:
            model.edits[m].active = False
            off = _logits(model, tok, PROBE)
            model.edits[m].active = True
            for other in METHODS:
                model.remove_edit(other)
            for other in METHODS:
                if other != m:
                    model.load_edit(Path(tmp) / other, name=other)
            removed = _logits(model, tok, PROBE)
            for other in [o for o in METHODS if o in model.edits]:
                model.remove_edit(other)
            for other in METHODS:
                model.load_edit(Path(tmp) / other, name=other)
            checks.append((m, torch.equal(off, removed), torch.equal(_logits(model, tok, PROBE), full)))
    for m in METHODS:
        model.remove_edit(m)
    rows = [{"method": m, "facts": len(groups[m]), "s/edit": round(seconds[m], 2),
             "rel stacked": round(_mean(stacked[m], "reliability"), 3),
             "rel alone": round(_mean(alone[m], "reliability"), 3),
             "gen stacked": round(_mean(stacked[m], "generalization"), 3),
             "gen alone": round(_mean(alone[m], "generalization"), 3),
             "loc stacked": round(_mean(stacked[m], "locality"), 3),
             "loc alone": round(_mean(alone[m], "locality"), 3)} for m in METHODS]
    print_table(rows, list(rows[0]))
    for m, same_as_removed, restored in checks:
        print(f"{m}: switched off == removed (bitwise) {same_as_removed}; reloaded stack == before {restored}")
    print("all removed == base (bitwise):", torch.equal(_logits(model, tok, PROBE), base))


if __name__ == "__main__":
    main()
