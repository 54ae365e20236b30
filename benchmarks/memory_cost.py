"""Costs of the memory-based methods (SERAC, IKE) on the embedded model: seconds per added edit (a
memory insertion: one sentence embedding, plus IKE's k-NN over its demonstration pool) and the
latency each generated token gains while the memory is live — for prompts outside every edit's
scope (SERAC runs the base model for them, IKE still prepends its nearest fact) and for the edited
prompts themselves (SERAC's counterfactual model with the edit's descriptor; IKE's demonstrations).

    python benchmarks/memory_cost.py --method serac --editor runs/editors/serac-zsre [--edits 200]
    python benchmarks/memory_cost.py --method ike --editor runs/editors/ike-zsre [--edits 200] [--k 4]

All timings are medians of ``--repeats`` interleaved runs in one process (greedy, KV cache, batch
of 4, ``--new-tokens`` tokens; the per-token figure includes the prompt/prefix pass).
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
from common import editable_default_model, greedy_generate_seconds

import editpeft
from editpeft.evaluation import load_cases

UNRELATED = ["The Eiffel Tower is located in the city of", "The chemical symbol for gold is",
             "The capital of Japan is", "Water is made of hydrogen and"]


def seconds_per_token(model, tok, prompts: list[str], new_tokens: int) -> float:
    tok.padding_side = "left"
    enc = tok(prompts, return_tensors="pt", padding=True)
    return greedy_generate_seconds(model, enc, new_tokens, tok.pad_token_id) / new_tokens


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--method", choices=("serac", "ike"), required=True)
    ap.add_argument("--editor", required=True, help="the method's editor folder (or Hub repo id)")
    ap.add_argument("--data", default="../../shared/data/portability/zsre_one_hop.json")
    ap.add_argument("--edits", type=int, default=200)
    ap.add_argument("--k", type=int, default=None, help="IKE: demonstrations per prompt (default: the card's)")
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None, help="default: $OMP_NUM_THREADS, else 2")
    args = ap.parse_args()
    model, tok = editable_default_model(args.threads)
    editor = editpeft.load_editor(args.editor)
    config = {"k": args.k} if args.method == "ike" and args.k is not None else None
    requests = [c.requests[0] for c in load_cases(args.data)[:args.edits]]
    times = []
    for i, r in enumerate(requests):
        start = time.perf_counter()
        model.add_edit(args.method, r, name="memory", append=i > 0, editor=editor, config=config)
        times.append(time.perf_counter() - start)
    print(f"{args.method}: {len(times)} edits appended to one memory: first {times[0]:.3f} s (checks the editor "
          f"once), then median {statistics.median(times[1:] or times):.4f} s/edit, max {max(times[1:] or times):.4f} s")
    edited = [r.prompt for r in requests[:len(UNRELATED)]]
    rows: dict[str, list[float]] = {"no edit": [], "memory live, unrelated prompts": [],
                                    "memory live, edited prompts": []}
    seconds_per_token(model, tok, UNRELATED, 4)                              # warm-up
    for _ in range(args.repeats):
        with model.disabled_edits():
            rows["no edit"].append(seconds_per_token(model, tok, UNRELATED, args.new_tokens))
        rows["memory live, unrelated prompts"].append(seconds_per_token(model, tok, UNRELATED, args.new_tokens))
        rows["memory live, edited prompts"].append(seconds_per_token(model, tok, edited, args.new_tokens))
    base = statistics.median(rows["no edit"])
    print(f"generate, batch {len(UNRELATED)}, {args.new_tokens} new tokens, {torch.get_num_threads()} threads, "
          f"median of {args.repeats}, {len(requests)} edits in the memory")
    print("| setup | ms/token | added ms/token | ratio |")
    print("|---|---|---|---|")
    for label, values in rows.items():
        med = statistics.median(values)
        print(f"| {label} | {med * 1000:.1f} | {(med - base) * 1000:+.1f} | {med / base:.2f} |")


if __name__ == "__main__":
    main()
