"""Sweep ROME's edited layer (and optional overrides) on known CounterFact cases.

    python benchmarks/rome_sweep.py --layers 2 3 4 6 8 --n 20 --config '{"v_lr": 2.0}'

Prints one row per layer: reliability / generalization (token_em) and locality (top-1 kept),
median seconds per edit. Statistics are computed (or read from the cache) before timing.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

from common import known_cases, load_counterfact, print_table, request_of, score_case, editable_default_model
from editpeft.evaluation.probes import top1

from editpeft.arch import get_arch
from editpeft.stats import second_moment


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, nargs="+", default=[2, 3, 4, 6, 8])
    ap.add_argument("--n", type=int, default=20)
    ap.add_argument("--config", default="{}")
    ap.add_argument("--method", default="rome")
    args = ap.parse_args()
    model, tok = editable_default_model()
    cases = known_cases(model, tok, load_counterfact())
    print(f"known cases: {len(cases)} of 1129; using {min(args.n, len(cases))}")
    cases = cases[: args.n]
    rows = []
    for layer in args.layers:
        cfg = {**json.loads(args.config), "layer": layer}
        if args.method == "rome":
            second_moment(model, tok, get_arch(model).mlp_out_name(layer))
        scores, times = [], []
        for c in cases:
            req = request_of(c)
            before = top1(model, tok, list(req.locality))
            t = time.perf_counter()
            model.add_edit(args.method, req, name="sweep", config=cfg)
            times.append(time.perf_counter() - t)
            scores.append(score_case(model, tok, req, before))
            model.remove_edit("sweep")
        row = {"layer": layer, **{k: sum(s[k] for s in scores) / len(scores) for k in scores[0]},
               "median_s": statistics.median(times)}
        rows.append(row)
        print(row, flush=True)
    print_table(rows, ["layer", "reliability", "generalization", "locality", "median_s"])


if __name__ == "__main__":
    main()
