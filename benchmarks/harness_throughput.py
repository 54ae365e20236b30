"""Scoring throughput of the harness on full CounterFact cases (no edit), packed vs. padded.

    python benchmarks/harness_throughput.py --n 30

A case is 1 rewrite + 2 paraphrases + 10 neighbourhood prompts, scored under token_em,
prob_margin and gen_em (no fluency). "baseline" is the once-per-case pass on the unedited model
that locality needs; "score" is the pass after an edit (timed here on the unedited model: the
cost does not depend on the edit).
"""
from __future__ import annotations

import argparse
import time

from common import COUNTERFACT, editable_default_model, print_table

from editpeft.evaluation import CaseScorer, load_cases


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=30)
    args = ap.parse_args()
    model, tok = editable_default_model()
    cases = load_cases(COUNTERFACT, n=args.n)
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
