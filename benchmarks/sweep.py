"""Sweep hyper-parameters of a method on known CounterFact cases, through the evaluation harness.

    python benchmarks/sweep.py --layers 2 3 4 6 8 --n 20 --config '{"v_lr": 2.0}'
    python benchmarks/sweep.py --method memit --mode batch --n 47 \\
        --grid '[{"layers": [2, 3, 4], "mom2_update_weight": 1000}, {"layers": [3, 4, 5, 6]}]'
    python benchmarks/sweep.py --method wise --data zsre --mode sequential --n 20 --grid '[{"lr": 0.01}]'
    python benchmarks/sweep.py --method ultraedit --data counterfact-edit --mode sequential --n 500 \\
        --batch-size 100 --grid '[{"lr": 0.001}]'
    python benchmarks/sweep.py --method memit --mode batch --data counterfact-all --n 100 --reuse-values \\
        --grid '[{}, {"layers": [0, 1, 2, 3, 4], "stats_corpus": "generated", "mom2_update_weight": 2000.0}]'

``--reuse-values`` (single and batch mode) computes the mass-editing family's target values once per
request set and reuses them in every setting whose last edited layer and value options agree: they
are computed on the unedited model and do not depend on the solve, so a grid over λ, corpora or
lower layers costs one value optimisation, not one per setting (the scores are the same either way;
the later settings' seconds then leave the value optimisation out).

Prints one row per setting: reliability / generalization / locality (token_em) and median
seconds per edit (sequential mode: turns of --batch-size edits, every edit scored after the last). Each run is kept (and resumed) under runs/sweep/<method>-<setting>/.
"""
from __future__ import annotations

import argparse
import json
import re
from typing import Callable

from common import COUNTERFACT, DATA, editable_default_model, print_table

from editpeft.evaluation import evaluate


#: Sweep data: CounterFact's known facts, its first cases whether known or not (the cf-batch100 setting of
#: eval_cards.py), or zsRE test records (facts the model need not know).
DATASETS = {"counterfact": (COUNTERFACT, True), "counterfact-all": (COUNTERFACT, False),
            "zsre": (DATA / "zsre" / "knowedit_zsre_test_all.json", False),
            "counterfact-edit": (DATA / "counterfact" / "easyedit_counterfact_edit.json", False)}


def reusing_values(optimize: Callable) -> Callable:
    """``optimize`` (:func:`editpeft.locate.optimize_values`) remembering its results per (module, requests,
    templates, options); only valid while the model it runs on does not change between calls."""
    memo: dict = {}

    def cached(model, tokenizer, module_name, requests, templates, **options):
        key = (module_name, tuple((r.prompt, r.subject, r.target_new) for r in requests), tuple(templates),
               tuple(sorted((k, repr(v)) for k, v in options.items())))
        if key not in memo:
            memo[key] = optimize(model, tokenizer, module_name, requests, templates, **options)
        return memo[key]

    return cached


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, nargs="*", default=[], help="single-layer settings ({'layer': L})")
    ap.add_argument("--grid", default="[]", help="JSON list of config overrides, one setting each")
    ap.add_argument("--n", type=int, default=20)
    ap.add_argument("--config", default="{}", help="overrides shared by every setting")
    ap.add_argument("--method", default="rome")
    ap.add_argument("--mode", default="single", choices=["single", "batch", "sequential"])
    ap.add_argument("--data", default="counterfact", choices=list(DATASETS))
    ap.add_argument("--batch-size", type=int, default=1, help="sequential mode: edits per turn")
    ap.add_argument("--out", default="runs/sweep")
    ap.add_argument("--reuse-values", action="store_true",
                    help="single/batch mode: MEMIT, AlphaEdit and EMMET optimise each request set's target values "
                         "once for all settings")
    args = ap.parse_args()
    if args.reuse_values:
        if args.mode == "sequential":
            raise SystemExit("--reuse-values needs --mode single or batch: a sequential turn's values depend on the "
                             "edits before it")
        import editpeft.mass_edit
        editpeft.mass_edit.optimize_values = reusing_values(editpeft.mass_edit.optimize_values)
    settings = [{"layer": layer} for layer in args.layers] + json.loads(args.grid)
    if not settings:
        raise SystemExit("give --layers or --grid")
    model, tok = editable_default_model()
    rows = []
    for setting in settings:
        config = {**json.loads(args.config), **setting}
        label = re.sub(r"[^A-Za-z0-9]+", "-", json.dumps(setting, sort_keys=True)).strip("-")
        data, known_only = DATASETS[args.data]
        batch = {"batch_size": args.batch_size, "checkpoints": [args.n]} if args.mode == "sequential" else {"batch_size": args.n}
        s = evaluate(model, tok, args.method, data, n=args.n, known_only=known_only, config=config, mode=args.mode,
                     out=f"{args.out}/{args.method}-{args.data}-{args.mode}-{label}", **batch)[args.method]
        m = s["metrics"]
        rows.append({"setting": json.dumps(setting), "cases": s["counts"]["scored"],
                     **{k: m[k]["token_em"]["mean"] for k in ("reliability", "generalization", "locality")},
                     "median_s": s["efficiency"].get("edit_seconds_median")})
    print_table(rows, list(rows[0]))


if __name__ == "__main__":
    main()
