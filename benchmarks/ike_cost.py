"""IKE's costs on the embedded model: seconds per added edit (a memory insertion: one embedding and
one k-NN over the pool) and the latency each generated token gains when an IKE adapter routes the
batch (the prefix runs once per sequence; every further token attends to it).

    python benchmarks/ike_cost.py --pool editors/ike [--edits 200] [--k 16] [--new-tokens 32]
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
from common import editable_default_model

import editpeft
from editpeft.evaluation import load_cases

PROMPTS = ["The Eiffel Tower is located in the city of", "The chemical symbol for gold is",
           "The capital of Japan is", "Water is made of hydrogen and"]


def seconds_per_token(model, tok, new_tokens: int, repeats: int) -> float:
    tok.padding_side = "left"
    enc = tok(PROMPTS, return_tensors="pt", padding=True)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        model.generate(**enc, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                       pad_token_id=tok.pad_token_id)
        times.append((time.perf_counter() - start) / new_tokens)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--pool", required=True, help="the IKE demonstration pool (editor folder or Hub id)")
    ap.add_argument("--data", default="../../shared/data/portability/zsre_one_hop.json")
    ap.add_argument("--edits", type=int, default=200)
    ap.add_argument("--k", type=int, default=16)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(2)
    model, tok = editable_default_model()
    pool = editpeft.load_editor(args.pool)
    start = time.perf_counter()
    pool.fact_embeddings()
    print(f"pool: {len(pool.facts)} facts, {len(pool.demonstrations)} demonstrations, embedded once in "
          f"{time.perf_counter() - start:.2f} s")
    requests = [c.requests[0] for c in load_cases(args.data)[:args.edits]]
    times = []
    for i, r in enumerate(requests):
        start = time.perf_counter()
        model.add_edit("ike", r, name="memory", append=i > 0, editor=pool, config={"k": args.k})
        times.append(time.perf_counter() - start)
    print(f"{len(times)} edits appended to one memory: median {statistics.median(times):.4f} s/edit, "
          f"max {max(times):.4f} s")
    with model.disabled_edits():
        base = seconds_per_token(model, tok, args.new_tokens, args.repeats)
    edited = seconds_per_token(model, tok, args.new_tokens, args.repeats)
    print(f"generate, batch of {len(PROMPTS)}, {args.new_tokens} new tokens (incl. the prefix pass): "
          f"{base * 1000:.1f} ms/token without edits, {edited * 1000:.1f} ms/token with IKE (k={args.k}, "
          f"{len(requests)} facts): +{(edited - base) * 1000:.1f} ms/token")


if __name__ == "__main__":
    main()
