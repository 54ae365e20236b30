"""Is WISE's routing selective? After N sequential zsRE edits into one adapter, print the sequence
activation score (the mean over its tokens, the highest over the memories) of each edit's prompt, its
first paraphrase and its unrelated (locality) question, against the routing threshold ε.

    python benchmarks/wise_routing.py --n 10
    python benchmarks/wise_routing.py --n 10 --config '{"alpha": 5, "beta": 20, "gamma": 10}'

A selective router has prompt and paraphrase scores above ε and locality scores below it; the last
line counts them.
"""
from __future__ import annotations

import argparse
import json

import torch
from common import DATA, editable_default_model, print_table
from editpeft_wise import sequence_scores

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

    def score(text: str) -> float:
        """The highest sequence score over the memories (what routing compares with ε)."""
        enc = tok(text, return_tensors="pt")
        with torch.no_grad(), adapter.switched_off():
            acts = activations_at(model, module, dict(enc)).reshape(1, -1, memories[0].shape[1]).float()
        return max(float(sequence_scores(acts, enc["attention_mask"], d)) for d in memories)

    rows = []
    for case in cases:
        request = case.requests[0]
        locality = next(iter(case.locality.values()))[0].prompt
        rows.append({"prompt": request.prompt[:40], "prompt score": round(score(request.prompt), 1),
                     "paraphrase score": round(score(case.generalization[0].prompt), 1)
                     if case.generalization else None,
                     "locality score": round(score(locality), 1)})
    print(f"threshold ε = {threshold:.1f} after {args.n} edits")
    print_table(rows, list(rows[0]))
    above = {k: sum(r[k] is not None and r[k] >= threshold for r in rows) for k in list(rows[0])[1:]}
    print("routed to the side memory: " + ", ".join(f"{k} {v}/{len(rows)}" for k, v in above.items()))


if __name__ == "__main__":
    main()
