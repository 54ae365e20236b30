"""Why UltraEdit's turns reach unrelated prompts on this model: how much of an unrelated prompt's key
lies in the span of one turn's editing keys, and how large its output change is.

    cd benchmarks
    python ultraedit_span.py --n 100

One turn of ``--n`` CounterFact-edit requests with the card's settings; for each edited module, at the
last prompt token of the edited prompts and of their locality prompts (edits switched off): the
share of the key's norm inside the span of the turn's keys (the update ΔW = V Kᵀ(KKᵀ + λI)⁻¹ is zero
only on the orthogonal complement), the output change |Δy| = |ΔW k|, and the same with the edit keys'
mean removed (whether a common direction carries the change).
"""
from __future__ import annotations

import argparse

import torch
from common import DATA, editable_default_model, print_table

from editpeft.evaluation import load_dataset
from editpeft.probe import activations_at


def last_token_keys(model, tok, module, prompts: list[str]) -> torch.Tensor:
    rows = []
    with model.disabled_edits():
        for p in prompts:
            a = activations_at(model, module, dict(tok(p, return_tensors="pt")))
            rows.append(a.reshape(-1, a.shape[-1])[-1].double())
    return torch.stack(rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=100)
    ap.add_argument("--threads", type=int)
    args = ap.parse_args()
    model, tok = editable_default_model(args.threads)
    cases = load_dataset(DATA / "counterfact" / "easyedit_counterfact_edit.json").cases[:args.n]
    requests = [c.requests[0] for c in cases]
    adapter = model.add_edit("ultraedit", requests, name="turn")
    prompts = {"edited prompts": [r.prompt for r in requests],
               "locality prompts": [p.prompt for c in cases for probes in c.locality.values() for p in probes]}
    rows = []
    for target, delta in adapter.deltas.items():
        up, down = delta.up.double(), delta.down.double()        # ΔW = up @ downᵀ; span(down) = span(Kᵀ)
        basis, _ = torch.linalg.qr(down)
        module = model.get_submodule(target)
        keys = {label: last_token_keys(model, tok, module, ps) for label, ps in prompts.items()}
        mean = keys["edited prompts"].mean(0)
        for label, x in keys.items():
            rows.append({"module": target, "prompts": label, "n": len(x), "turn keys": down.shape[1],
                         "share in span": float(((x @ basis).norm(dim=1) / x.norm(dim=1)).median()),
                         "|dy| median": float(((x @ down) @ up.T).norm(dim=1).median()),
                         "|dy|, mean removed": float((((x - mean) @ down) @ up.T).norm(dim=1).median())})
    print_table(rows, list(rows[0]))


if __name__ == "__main__":
    main()
