"""Seconds per MELO append on a grown adapter: which cluster each edit joins and what it replays.

    cd benchmarks
    python melo_append_cost.py runs/cards/zsre-seq1000-n100/melo/state/eval-seq --start 100 --n 6
    python melo_append_cost.py runs/cards/zsre-seq1000-n100/melo/state/eval-seq --start 100 --n 6 \\
        --config '{"replay": false}'

Loads a saved MELO adapter (e.g. a sequential run's checkpoint), appends the next ``--n`` zsRE test
records one by one (``--start``: the first record not yet edited) and prints, per edit, the block it
joined (new or existing), the earlier edits of that block replayed with it and the seconds it took.
"""
from __future__ import annotations

import argparse
import json
import time

from common import DATA, editable_default_model, print_table

from editpeft.evaluation import load_dataset


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("adapter", help="a saved MELO adapter folder")
    ap.add_argument("--start", type=int, required=True, help="index of the first zsRE test record to append")
    ap.add_argument("--n", type=int, default=6)
    ap.add_argument("--config", default="{}", help="overrides of the adapter's hyper-parameters for the appends")
    ap.add_argument("--threads", type=int)
    args = ap.parse_args()
    model, tok = editable_default_model(args.threads)
    adapter = model.load_edit(args.adapter, name="melo")
    config = {**adapter.hparams, **json.loads(args.config)}
    cases = load_dataset(DATA / "zsre" / "knowedit_zsre_test_all.json").cases[args.start:args.start + args.n]
    rows = []
    for case in cases:
        before = model.edits["melo"]
        opened = before.factors[next(iter(before.factors))][0].shape[0] // before.rank
        t0 = time.perf_counter()
        after = model.add_edit("melo", list(case.requests), name="melo", append=True, config=config)
        seconds = time.perf_counter() - t0
        block = after.request_blocks[-1]
        members = sum(1 for b in after.request_blocks[:-1] if b == block)
        replayed = min(members, config["max_replay"]) if config.get("replay") and config.get("max_replay") is not None \
            else (members if config.get("replay") else 0)
        rows.append({"edit": len(after.request_blocks), "block": block, "new block": block >= opened,
                     "earlier edits in block": members, "replayed": replayed, "seconds": seconds})
    print_table(rows, list(rows[0]))


if __name__ == "__main__":
    main()
