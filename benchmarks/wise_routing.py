"""Is WISE's routing selective? After N sequential zsRE edits into one adapter, print each edit's
activation score at the last token of its prompt and of its first paraphrase, and the highest
per-token score on its unrelated (locality) question, against the routing threshold ε.

    python benchmarks/wise_routing.py --n 10
    python benchmarks/wise_routing.py --n 10 --config '{"alpha": 5, "beta": 20, "gamma": 10}'

A selective router has prompt and paraphrase scores above ε and locality scores below it.
"""
from __future__ import annotations

import argparse
import json

import torch
from common import DATA, editable_default_model, print_table
from editpeft_wise import activation_scores

from editpeft.evaluation import load_dataset
from editpeft.probe import activations_at


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=10)
    ap.add_argument("--config", default="{}")
    args = ap.parse_args()
    model, tok = editable_default_model()
    cases = load_dataset(DATA / "zsre" / "knowedit_zsre_test_all.json").cases[:args.n]
    for i, case in enumerate(cases):
        model.add_edit("wise", case.requests[0], name="wise", config=json.loads(args.config), append=i > 0)
    adapter = model.edits["wise"]
    memories, threshold = adapter.memory.deltas(), adapter.memory.threshold(adapter.act_ratio)
    module = model.get_submodule(adapter.targets[0])

    def scores(text: str) -> torch.Tensor:
        """Per token, the highest score over the memories (what routing compares with ε)."""
        with torch.no_grad(), adapter.switched_off():
            acts = activations_at(model, module, dict(tok(text, return_tensors="pt")))
        acts = acts.reshape(-1, acts.shape[-1]).float()
        return torch.stack([activation_scores(acts, d) for d in memories]).max(0).values

    rows = []
    for case in cases:
        request = case.requests[0]
        locality = next(iter(case.locality.values()))[0].prompt
        rows.append({"prompt": request.prompt[:40], "prompt score": round(float(scores(request.prompt)[-1]), 1),
                     "paraphrase score": round(float(scores(case.generalization[0].prompt)[-1]), 1)
                     if case.generalization else None,
                     "locality max token": round(float(scores(locality).max()), 1)})
    print(f"threshold ε = {threshold:.1f} after {args.n} edits")
    print_table(rows, list(rows[0]))


if __name__ == "__main__":
    main()
