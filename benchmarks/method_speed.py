"""Seconds per edit of every method next to ROME's, and peak memory against batch size.

Each (method, batch size) runs in a fresh process on the embedded model (2 threads) so that its
peak resident memory is its own; the key statistics are read from the cache (run
``editpeft stats`` first; the table says where they came from). The facts are the first known
CounterFact facts. Only the edit is timed (no scoring).

    cd benchmarks
    python method_speed.py                                  # every method, batch sizes 1 and 8
    python method_speed.py --methods memit alphaedit --batch-sizes 1 4 16 32
    python method_speed.py --methods mend ke serac --batch-sizes 1 --facts 20 \
        --editor mend=runs/editors/mend-zsre --editor ke=runs/editors/ke-zsre --editor serac=runs/editors/serac-zsre

Methods that edit with a trained editor get it from ``--editor``; their first edit (which loads the
editor and checks it against the model once) is made before the timing starts.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

from common import COUNTERFACT, print_table


def run_one(method: str, batch: int, n_facts: int, editor: str | None = None, threads: int = 2) -> dict:
    """Inside the child process: edit ``n_facts`` facts in batches of ``batch``; report timings."""
    from common import editable_default_model

    import editpeft
    from editpeft.evaluation import load_cases
    from editpeft.evaluation.runner import known_mask, peak_memory_mb
    from editpeft.stats import counters

    model, tok = editable_default_model(threads)
    cases = load_cases(COUNTERFACT)
    known = [c for c, k in zip(cases, known_mask(model, tok, cases)) if k][:n_facts]
    requests = [c.requests[0] for c in known]
    extra = {"editor": editpeft.load_editor(editor)} if editor else {}
    if extra:                                   # loads and checks the editor once, untimed
        model.add_edit(method, requests[0], name="warm-up", **extra)
        model.remove_edit("warm-up")
    base_rss = peak_memory_mb()
    seconds, size = 0.0, 0
    for start in range(0, len(requests), batch):
        group = requests[start:start + batch]
        t = time.perf_counter()
        adapter = model.add_edit(method, group if batch > 1 else group[0], name=f"e{start}", **extra)
        seconds += time.perf_counter() - t
        size += adapter.num_bytes()
        model.remove_edit(f"e{start}")
    c = counters(model)
    return {"method": method, "batch": batch, "edits": len(requests), "s_per_edit": seconds / len(requests),
            "peak_rss_mb": peak_memory_mb(),
            "rss_after_load_mb": base_rss, "bytes_per_edit": size // len(requests),
            "stats": f"computed {c.computed}, disk {c.disk_hits}, memory {c.memory_hits}"}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--methods", nargs="*", default=["rome", "memit", "alphaedit", "emmet", "kn", "grace"])
    ap.add_argument("--batch-sizes", nargs="*", type=int, default=[1, 8])
    ap.add_argument("--facts", type=int, default=8, help="known CounterFact facts edited per run")
    ap.add_argument("--editor", action="append", default=[], metavar="METHOD=PATH",
                    help="the trained editor of a method that edits with one (repeatable)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    editors = dict(e.split("=", 1) for e in args.editor)
    if args.child:
        method, batch = args.child.split(":")
        print(json.dumps(run_one(method, int(batch), args.facts, editors.get(method), args.threads)))
        return
    rows = []
    for method in args.methods:
        for batch in args.batch_sizes:
            cmd = [sys.executable, __file__, "--child", f"{method}:{batch}", "--facts", str(args.facts),
                   "--threads", str(args.threads), *(f"--editor={e}" for e in args.editor)]
            out = subprocess.run(cmd, capture_output=True, text=True)
            if out.returncode != 0:
                print(out.stderr[-2000:], file=sys.stderr)
                rows.append({"method": method, "batch": batch, "stats": "failed"})
                continue
            rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
            print(f"{method} batch {batch}: {rows[-1]['s_per_edit']:.2f} s/edit", file=sys.stderr)
    rome = {r["batch"]: r.get("s_per_edit") for r in rows if r["method"] == "rome"}
    for r in rows:
        ref = rome.get(r["batch"]) or rome.get(1)
        r["x_rome"] = r["s_per_edit"] / ref if ref and r.get("s_per_edit") else None
    print_table(rows, ["method", "batch", "edits", "s_per_edit", "x_rome", "peak_rss_mb", "rss_after_load_mb",
                       "bytes_per_edit", "stats"])


if __name__ == "__main__":
    main()
