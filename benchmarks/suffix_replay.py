"""The locate-then-edit value optimisation from the edited block up, against the whole model.

For each known CounterFact fact and method, the same edit is made twice in one process — with
``suffix_replay`` on (the default: the blocks below the edited one run once, see
:class:`editpeft.suffix.BlockSuffix`) and off — and the
table gives the median edit seconds of each, the largest difference between the two adapters'
weight changes relative to the change's scale, and both adapters' harness scores (token_em).

    cd benchmarks
    python suffix_replay.py --methods rome memit alphaedit emmet --facts 10 --threads 2

Measured 2026-12-06 (1 thread, the other core busy with another benchmark; 10 known facts):
ROME 5.82 s against 6.21 s (1.07x), MEMIT 1.05x, AlphaEdit 1.07x, EMMET 1.05x; the weight changes
bitwise equal (the replay runs the same blocks on the same inputs) and the harness scores the same.
The edited layers (2-4 of 30) leave 3.5-5% of a step below them (``layer_share.py``). Tried and
dropped: a KV cache of the positions before the subject (51 of 126 positions per step) gave no
speed-up either — at 5-24 positions per row group each block's matmuls run at ~28 GFLOPS, bound
by reading the weights, so a step costs per weight pass rather than per position.
"""
from __future__ import annotations

import argparse
import statistics
import time

from common import COUNTERFACT, editable_default_model, print_table

import torch

from editpeft.evaluation import CaseScorer, load_cases
from editpeft.evaluation.runner import known_mask


def weight_change(model, adapter) -> dict[str, torch.Tensor]:
    """Every module's dense weight change in float64."""
    return {name: d.dense(model.get_submodule(name)).double() for name, d in adapter.deltas.items()}


def timed_edit(model, method: str, request, replay: bool, name: str):
    t = time.perf_counter()
    adapter = model.add_edit(method, request, name=name, config={"suffix_replay": replay})
    return adapter, time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--methods", nargs="*", default=["rome", "memit", "alphaedit", "emmet"])
    ap.add_argument("--facts", type=int, default=10, help="known CounterFact facts edited per method")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    model, tok = editable_default_model(args.threads)
    cases = load_cases(COUNTERFACT)
    known = [c for c, k in zip(cases, known_mask(model, tok, cases)) if k][:args.facts]
    scorer = CaseScorer(model, tok, protocols=("token_em",))
    with model.disabled_edits():
        baselines = scorer.baseline(known)
    rows = []
    for method in args.methods:
        model.add_edit(method, known[0].requests[0], name="warm-up")    # statistics and templates, untimed
        model.remove_edit("warm-up")
        seconds = {True: [], False: []}
        scores = {True: [], False: []}
        worst = 0.0
        for i, case in enumerate(known):
            changes = {}
            for replay in (True, False):
                adapter, s = timed_edit(model, method, case.requests[0], replay, f"{method}-{i}-{replay}")
                seconds[replay].append(s)
                scores[replay].append(scorer.score([case], [baselines[i]])[0])
                changes[replay] = weight_change(model, adapter)
                model.remove_edit(adapter.name)
            print(f"{method} fact {i}: {seconds[True][-1]:.2f} s replayed, {seconds[False][-1]:.2f} s whole",
                  flush=True)
            for name, fast in changes[True].items():
                slow = changes[False][name]
                worst = max(worst, float((fast - slow).abs().max() / slow.abs().max()))
        row = {"method": method, "facts": len(known),
               "median s, replay": statistics.median(seconds[True]),
               "median s, whole model": statistics.median(seconds[False]),
               "speed-up": statistics.median(seconds[False]) / statistics.median(seconds[True]),
               "max |ΔW diff| / max |ΔW|": f"{worst:.1e}"}
        for replay, label in ((True, "replay"), (False, "whole")):
            for metric in ("reliability", "generalization", "locality"):
                row[f"{metric[:3]} {label}"] = statistics.mean(s[metric]["token_em"] for s in scores[replay])
        rows.append(row)
    print_table(rows, list(rows[0]))


if __name__ == "__main__":
    main()
