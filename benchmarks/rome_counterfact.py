"""ROME single edits (edit, score, remove) on the known CounterFact cases of the embedded model.

    python benchmarks/rome_counterfact.py [--n 1000] [--config '{...}']

Statistics are computed once before timing (and reported separately); median seconds per edit,
peak RSS, adapter folder size and its ratio to a full saved model are printed in one table.
"""
from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

from common import known_cases, load_counterfact, peak_rss_mb, print_table, request_of, score_case, editable_default_model
from editpeft.evaluation.probes import top1

import editpeft
from editpeft.arch import get_arch
from editpeft.models import converted_model_dir
from editpeft.stats import second_moment


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=1000)
    ap.add_argument("--config", default="{}")
    args = ap.parse_args()
    model, tok = editable_default_model()
    cfg = editpeft.registry.get_method("rome").resolve_config(model, json.loads(args.config))
    t = time.perf_counter()
    second_moment(model, tok, get_arch(model).mlp_out_name(cfg.layer), corpus=cfg.stats_corpus, n_tokens=cfg.stats_tokens)
    stats_s = time.perf_counter() - t
    all_cases = load_counterfact()
    cases = known_cases(model, tok, all_cases)[: args.n]
    scores, times = [], []
    adapter_bytes = 0
    for c in cases:
        req = request_of(c)
        before = top1(model, tok, list(req.locality))
        t = time.perf_counter()
        adapter = model.add_edit("rome", req, name="e", config=cfg)
        times.append(time.perf_counter() - t)
        scores.append(score_case(model, tok, req, before))
        if not adapter_bytes:
            with tempfile.TemporaryDirectory() as tmp:
                adapter.save_pretrained(f"{tmp}/a", readme=False)
                adapter_bytes = sum(p.stat().st_size for p in Path(f"{tmp}/a").iterdir())
        model.remove_edit("e")
    full = (converted_model_dir() / "model.safetensors").stat().st_size
    row = {"known_cases": f"{len(cases)}/{len(all_cases)}", "layer": cfg.layer,
           **{k: sum(s[k] for s in scores) / len(scores) for k in scores[0]},
           "median_s_per_edit": statistics.median(times), "stats_s": stats_s, "peak_rss_mb": peak_rss_mb(),
           "adapter_bytes": adapter_bytes, "full_model_bytes": full, "ratio": f"1:{full // max(adapter_bytes, 1)}"}
    print_table([row], list(row))


if __name__ == "__main__":
    main()
