"""Sweep a locate-then-edit method's layer (and optional overrides) on known CounterFact cases,
through the evaluation harness.

    python benchmarks/rome_sweep.py --layers 2 3 4 6 8 --n 20 --config '{"v_lr": 2.0}'

Prints one row per layer: reliability / generalization / locality (token_em), median seconds
per edit. Each layer's run is kept (and resumed) under runs/sweep/<method>-layer<L>/.
"""
from __future__ import annotations

import argparse
import json

from common import COUNTERFACT, editable_default_model, print_table

from editpeft.evaluation import evaluate


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, nargs="+", default=[2, 3, 4, 6, 8])
    ap.add_argument("--n", type=int, default=20)
    ap.add_argument("--config", default="{}")
    ap.add_argument("--method", default="rome")
    ap.add_argument("--out", default="runs/sweep")
    args = ap.parse_args()
    model, tok = editable_default_model()
    rows = []
    for layer in args.layers:
        config = {**json.loads(args.config), "layer": layer}
        s = evaluate(model, tok, args.method, COUNTERFACT, n=args.n, known_only=True, config=config,
                     out=f"{args.out}/{args.method}-layer{layer}")[args.method]
        m = s["metrics"]
        rows.append({"layer": layer, "cases": s["counts"]["scored"],
                     **{k: m[k]["token_em"]["mean"] for k in ("reliability", "generalization", "locality")},
                     "median_s": s["efficiency"].get("edit_seconds_median")})
    print_table(rows, list(rows[0]))


if __name__ == "__main__":
    main()
