"""CaliNet card sweep: the first N zsRE test cases edited one after another into one adapter
(sequential, batch 1), every edit scored after the last; one JSON row per setting.

    python benchmarks/calinet_sweep.py 15 '[{}, {"lr": 0.001}, {"lr": 0.001, "replay": 8}]'
"""
from __future__ import annotations

import json
import sys
import tempfile
import time

from common import DATA, editable_default_model

from editpeft.evaluation import evaluate


def main() -> None:
    n, grid = int(sys.argv[1]), json.loads(sys.argv[2])
    model, tok = editable_default_model()
    for config in grid:
        start = time.time()
        with tempfile.TemporaryDirectory() as out:
            s = evaluate(model, tok, "calinet", DATA / "zsre" / "knowedit_zsre_test_all.json", n=n, mode="sequential",
                         batch_size=1, checkpoints=[n], config=config, out=out, progress=False)["calinet"]
        m = s["metrics"]
        row = {k: round(m[k]["token_em"]["mean"], 3) for k in ("reliability", "generalization", "locality") if k in m}
        row.update(median_s=round(s["efficiency"].get("edit_seconds_median", float("nan")), 2),
                   failed=s["failed_edits"], wall_s=round(time.time() - start))
        print(json.dumps({"config": config, **row}), flush=True)


if __name__ == "__main__":
    main()
