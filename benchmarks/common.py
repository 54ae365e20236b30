"""Shared helpers of the benchmark scripts: data paths, model setup, table printing."""
from __future__ import annotations

import os
from pathlib import Path

import torch


DATA = Path(os.environ.get("EDITPEFT_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
COUNTERFACT = DATA / "counterfact" / "counterfact_rome_format_1129.json"


def print_table(rows: list[dict], columns: list[str]) -> None:
    print("| " + " | ".join(columns) + " |")
    print("|" + "---|" * len(columns))
    for r in rows:
        print("| " + " | ".join(_fmt(r.get(c)) for c in columns) + " |")


def _fmt(v) -> str:
    return f"{v:.3f}" if isinstance(v, float) else str(v)


def setup_threads(n: int | None = None) -> None:
    """torch's intra-op threads: ``n``, else ``$OMP_NUM_THREADS``, else 2 (the benchmark machine's
    cores). On a 2-core machine shared with another job use 1: two threads then spin-wait for
    each other and run several times slower than one."""
    torch.set_num_threads(n or int(os.environ.get("OMP_NUM_THREADS") or 2))


def editable_default_model(threads: int | None = None):
    """(editable embedded model, tokenizer) with the benchmarks' thread count (see :func:`setup_threads`)."""
    import editpeft
    setup_threads(threads)
    model, tok = editpeft.load_default_model()
    return editpeft.enable_editing(model, tok), tok


def greedy_generate_seconds(model, enc, new_tokens: int, pad_token_id: int) -> float:
    """Wall seconds of one greedy ``generate`` of exactly ``new_tokens`` tokens per row of ``enc``."""
    import time
    start = time.perf_counter()
    with torch.no_grad():
        model.generate(**enc, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                       pad_token_id=pad_token_id)
    return time.perf_counter() - start
