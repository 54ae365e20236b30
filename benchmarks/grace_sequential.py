"""GRACE: N sequential edits appended to one codebook adapter, scored after the last one.

    python benchmarks/grace_sequential.py --n 100 --config '{"eps_init": 3.0}'

Reliability / generalization are token_em of the new target on the edit prompt / paraphrases,
locality is the fraction of neighbourhood prompts whose greedy next token is unchanged from the
unedited model, all measured after all N edits are in place. Uses the first N CounterFact cases.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

from common import load_counterfact, peak_rss_mb, print_table, request_of, score_case, editable_default_model
from editpeft.evaluation.probes import top1



def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=100)
    ap.add_argument("--config", default="{}")
    args = ap.parse_args()
    model, tok = editable_default_model()
    reqs = [request_of(c) for c in load_counterfact()[: args.n]]
    before = [top1(model, tok, list(r.locality)) for r in reqs]
    cfg = json.loads(args.config)
    times = []
    for i, r in enumerate(reqs):
        t = time.perf_counter()
        model.add_edit("grace", r, name="memory", config=cfg, append=i > 0)
        times.append(time.perf_counter() - t)
    scores = [score_case(model, tok, r, b) for r, b in zip(reqs, before)]
    adapter = model.edits["memory"]
    row = {"edits": args.n, "entries": len(adapter), **{k: sum(s[k] for s in scores) / len(scores) for k in scores[0]},
           "median_s": statistics.median(times), "peak_rss_mb": peak_rss_mb(), "config": json.dumps(cfg)}
    print_table([row], list(row))


if __name__ == "__main__":
    main()
