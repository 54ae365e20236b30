"""Cost of editpeft's hooks and routers around ``model.generate`` on the embedded model.

Tokens per second of greedy generation (batch of 4 prompts, 48 new tokens, KV cache) with:
no edit; one ROME weight delta (a forward hook on one projection); one pass-through router (live,
deciding every row out of scope, so the routing machinery runs and changes nothing). All three are
measured in one run, interleaved, median of ``--repeats``; the table gives each ratio to "no edit".

    python benchmarks/generate_throughput.py [--repeats 5] [--new-tokens 48]
"""
from __future__ import annotations

import argparse
import statistics

import torch

from common import greedy_generate_seconds, setup_threads

import editpeft
from editpeft import EditRequest
from editpeft.registry import registered

PROMPTS = ["The Eiffel Tower is located in the city of", "The chemical symbol for gold is",
           "The capital of Japan is", "Water is made of hydrogen and"]


class PassThroughRouter(editpeft.RouterAdapter):
    """A live router that puts no row in scope (the default ``decide``)."""

    def state_dict(self):
        return {}

    @classmethod
    def from_saved(cls, tensors, extra, **common):
        return cls(**common)


class PassThrough(editpeft.EditMethod):
    name, kind, adapter_class = "bench-pass-through", "router", PassThroughRouter

    def compute(self, model, tokenizer, requests, config):
        return PassThroughRouter(method=self.name, hparams={}, requests=list(requests), targets=[])


def tokens_per_second(model, enc, new_tokens: int) -> float:
    seconds = greedy_generate_seconds(model, enc, new_tokens, editpeft.tokens.pad_id(model.edit_state.tokenizer))
    return new_tokens * enc["input_ids"].shape[0] / seconds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--new-tokens", type=int, default=48)
    args = ap.parse_args()
    setup_threads()
    model, tok = editpeft.load_default_model()
    model = editpeft.enable_editing(model, tok)
    enc = tok(PROMPTS, return_tensors="pt", padding=True, padding_side="left")
    rome = model.add_edit("rome", EditRequest(prompt=PROMPTS[0], subject="Eiffel Tower", target_new="Rome"),
                          name="rome")
    with registered(PassThrough):
        router = model.add_edit(PassThrough.name, EditRequest(prompt=PROMPTS[1], target_new="Ag"), name="router")
        setups = {"no edit": [], "one weight delta (ROME)": ["rome"], "one pass-through router": ["router"]}
        tokens_per_second(model, enc, 4)                                    # warm-up
        rates: dict[str, list[float]] = {k: [] for k in setups}
        for _ in range(args.repeats):
            for label, active in setups.items():
                model.set_active_edits(active)
                rates[label].append(tokens_per_second(model, enc, args.new_tokens))
    assert rome is not None and router is not None
    base = statistics.median(rates["no edit"])
    print(f"greedy generate, batch {len(PROMPTS)}, {args.new_tokens} new tokens, {torch.get_num_threads()} threads, "
          f"median of {args.repeats}")
    print("| setup | tokens/s | ratio to no edit |")
    print("|---|---|---|")
    for label, values in rates.items():
        med = statistics.median(values)
        print(f"| {label} | {med:.1f} | {med / base:.3f} |")


if __name__ == "__main__":
    main()
