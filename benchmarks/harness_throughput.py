"""Scoring throughput of the harness on full CounterFact cases (no edit), packed vs. padded, and
scored from the first edited block with kept unedited states (:mod:`editpeft.evaluation.prefix`).

    python benchmarks/harness_throughput.py --n 30
    python benchmarks/harness_throughput.py --n 30 --layers 3 20 27 --skip-padded

A case is 1 rewrite + 2 paraphrases + 10 neighbourhood prompts, scored under token_em,
prob_margin and gen_em (no fluency). "baseline" is the once-per-case pass on the unedited model
that locality needs; "score" is the pass after an edit (timed here on the unedited model: the
cost does not depend on the edit).

With ``--layers``, each row keeps the probes' states entering that block (the first block an edit
would write to, e.g. 3 for ROME, 27 for UltraEdit): the baseline then also records the states of
every probe the scored pass runs, the first score and a re-score (a later checkpoint of a
sequential run) run blocks L.. only; the scores are compared with the whole model's (token_em
disagreements, largest prob_margin_mean difference).
"""
from __future__ import annotations

import argparse
import time

from common import COUNTERFACT, editable_default_model, print_table

from editpeft.evaluation import CaseScorer, load_cases
from editpeft.evaluation.prefix import PrefixStates


def _leaves(scores, path=()):
    for k, v in scores.items():
        if isinstance(v, dict):
            yield from _leaves(v, path + (k,))
        else:
            yield path + (k,), v


def from_block(model, tok, cases, layers: list[int]) -> None:
    """Whole model against kept states at each layer: seconds per case and score differences."""
    rows, reference = [], None
    for layer in [None, *layers]:
        scorer = CaseScorer(model, tok)
        scorer.prefix = PrefixStates(layer) if layer is not None else None
        scorer.baseline(cases[:2])   # warm-up (and the replay's one check against the whole model)
        scorer.score(cases[:2], scorer.baseline(cases[:2]))
        t0 = time.perf_counter()
        base = [scorer.baseline([c])[0] for c in cases]
        t1 = time.perf_counter()
        first = [scorer.score([c], [b])[0] for c, b in zip(cases, base)]
        t2 = time.perf_counter()
        for c, b in zip(cases, base):
            scorer.score([c], [b])
        t3 = time.perf_counter()
        reference = reference or first
        got = [dict(_leaves(s)) for s in first]
        want = [dict(_leaves(s)) for s in reference]
        em_diff = sum(g[k] != w[k] for g, w in zip(got, want) for k in w if k[-1] in ("token_em", "gen_em"))
        margin = max((abs(g[k] - w[k]) for g, w in zip(got, want) for k in w if k[-1] == "prob_margin_mean"),
                     default=0.0)
        n = len(cases)
        rows.append({"scored from": f"block {layer}" if layer is not None else "whole model", "cases": n,
                     "baseline s/case": (t1 - t0) / n, "score s/case": (t2 - t1) / n,
                     "re-score s/case": (t3 - t2) / n, "baseline+score s/case": (t2 - t0) / n,
                     "em disagreements": em_diff, "max |d margin|": margin,
                     "kept MB": (scorer.prefix.nbytes() / 2**20) if scorer.prefix else 0.0})
    print_table(rows, list(rows[0]))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=30)
    ap.add_argument("--layers", type=int, nargs="*", default=[],
                    help="also score from these blocks with kept unedited states (compared with the whole model)")
    ap.add_argument("--skip-padded", action="store_true", help="skip the packed-vs-padded comparison")
    ap.add_argument("--threads", type=int)
    args = ap.parse_args()
    model, tok = editable_default_model(args.threads)
    cases = load_cases(COUNTERFACT, n=args.n)
    if args.layers:
        from_block(model, tok, cases, args.layers)
    if args.skip_padded:
        return
    rows = []
    for label, kw in [("packed (default)", {}), ("padded, one sequence per answer", {"packed": False})]:
        scorer = CaseScorer(model, tok, **kw)
        scorer.baseline(cases[:2])   # warm-up
        t0 = time.perf_counter()
        base = [scorer.baseline([c])[0] for c in cases]
        t1 = time.perf_counter()
        for c, b in zip(cases, base):
            scorer.score([c], [b])
        t2 = time.perf_counter()
        rows.append({"scoring": label, "cases": len(cases), "baseline s/case": (t1 - t0) / len(cases),
                     "score s/case": (t2 - t1) / len(cases), "total s/case": (t2 - t0) / len(cases)})
    print_table(rows, list(rows[0]))
    print(f"\npacked speed-up: {rows[1]['total s/case'] / rows[0]['total s/case']:.2f}x")


if __name__ == "__main__":
    main()
