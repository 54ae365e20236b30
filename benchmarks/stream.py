"""A stream of sequential edits: N edits in batches appended to one adapter per method, scored at
checkpoints on a fixed-size sample of the edits so far (so scoring cost does not grow with N) and on
every edit at the end; time, peak memory and adapter bytes per checkpoint; one curve plot.

    cd benchmarks
    python stream.py --methods ultraedit alphaedit --n 10000 --batch-size 100 --every 1000 --sample 200
    python stream.py --methods alphaedit --n 1000 --every 200 --sample 100 --out runs/stream-small

Resumable: run the same command again after an interruption (the harness keeps each method's run
folder and its adapters at the last checkpoint). Shardable: ``--shard i/k`` (or ``accelerate launch``,
which sets the rank) makes this process apply the whole stream and score every k-th sampled case;
``python stream.py --report-only ...`` then merges the shards' folders into the table and plot.
Each row of the printed table is one checkpoint: edits so far, cases scored, token_em reliability /
generalization / locality, cumulative edit seconds, adapter bytes, peak resident memory (MiB) and
the part of it the harness holds as the probes' kept states (scoring from the first edited block).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from common import DATA, editable_default_model

from editpeft.cli import resolve_shard
from editpeft.evaluation import evaluate
from editpeft.evaluation.report import combine, plot

STREAM_DATA = DATA / "counterfact" / "easyedit_counterfact_edit.json"
METRICS = ("reliability", "generalization", "locality")


def checkpoints(n: int, every: int, batch_size: int) -> list[int]:
    """1 batch, then every ``every`` edits, and ``n``."""
    return sorted({batch_size, *range(every, n + 1, every), n})


def print_curves(summaries: dict) -> None:
    print("| run | edits | scored | " + " | ".join(f"{m} (token_em)" for m in METRICS)
          + " | edit s (total) | s/edit | adapter bytes | bytes/edit | peak MiB | of which kept states MiB |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for label, s in summaries.items():
        for p in s.get("curve") or []:
            cells = [f"{p['metrics'].get(m, {}).get('token_em', {}).get('mean', float('nan')):.3f}" for m in METRICS]
            total = p.get("edit_seconds_total", float("nan"))
            print(f"| {label} | {p['edits']} | {p.get('scored', p['edits'])} | " + " | ".join(cells)
                  + f" | {total:.1f} | {total / p['edits']:.3f} | {p['adapter_bytes']:,} | "
                  f"{p['adapter_bytes'] / p['edits']:,.0f} | {p['peak_memory_mb']:,.0f} | "
                  f"{p.get('kept_states_mb', 0):,.0f} |")
    for label, s in summaries.items():
        final = s.get("metrics") or {}
        line = ", ".join(f"{m} " + "/".join(f"{final[m][p]['mean']:.3f}" for p in ("token_em", "prob_margin", "gen_em")
                                           if p in final.get(m, {})) for m in METRICS if m in final)
        print(f"{label}, all edits (token_em/prob_margin/gen_em): {line}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--methods", nargs="+", required=True)
    ap.add_argument("--data", type=Path, default=STREAM_DATA)
    ap.add_argument("--n", type=int, default=10_000)
    ap.add_argument("--batch-size", type=int, default=100)
    ap.add_argument("--every", type=int, default=1000, help="edits between checkpoints")
    ap.add_argument("--sample", type=int, default=200, help="cases scored per checkpoint (all at the last)")
    ap.add_argument("--config", action="append", default=[], metavar="METHOD=JSON",
                    help="hyper-parameters of a method (default: its card)")
    ap.add_argument("--protocols", default="token_em,prob_margin,gen_em")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--shard", help="i/k: score every k-th sampled case (each shard applies the whole stream)")
    ap.add_argument("--out", type=Path, default=Path("runs/stream"))
    ap.add_argument("--report-only", action="store_true", help="merge existing run folders (and shards) only")
    args = ap.parse_args()
    out = args.out / f"{args.data.stem}-n{args.n}-b{args.batch_size}"
    if not args.report_only:
        configs = {m: json.loads(c) for m, c in (x.split("=", 1) for x in args.config)}
        model, tok = editable_default_model(args.threads)
        shard = resolve_shard(args.shard)
        folder = out / (f"shard-{shard[0]}-of-{shard[1]}" if shard[1] > 1 else "single")
        for method in args.methods:
            evaluate(model, tok, method, args.data, out=folder, mode="sequential", n=args.n,
                     batch_size=args.batch_size, checkpoints=checkpoints(args.n, args.every, args.batch_size),
                     sample=args.sample, config={method: configs.get(method)} if method in configs else None,
                     protocols=[p for p in args.protocols.split(",") if p], shard=shard)
    summaries = combine([out])
    plot(summaries, out)
    print_curves(summaries)
    print(f"plots and per-method folders: {out}")


if __name__ == "__main__":
    main()
