"""Shared helpers of the benchmark scripts: data paths, known-fact filtering, table printing."""
from __future__ import annotations

import json
import os
import resource
from pathlib import Path

import torch

from editpeft import EditRequest
from editpeft.evaluation.probes import token_em, top1
from editpeft.tokens import target_token_ids

DATA = Path(os.environ.get("EDITPEFT_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
COUNTERFACT = DATA / "counterfact" / "counterfact_rome_format_1129.json"


def load_counterfact(path: Path = COUNTERFACT) -> list[dict]:
    if not path.is_file():
        raise SystemExit(f"benchmark data not found at {path}; set EDITPEFT_DATA to the shared data folder")
    return json.loads(path.read_text())


def request_of(case: dict) -> EditRequest:
    rw = case["requested_rewrite"]
    return EditRequest(prompt=rw["prompt"], subject=rw["subject"], target_new=rw["target_new"]["str"],
                       target_true=rw["target_true"]["str"], paraphrases=tuple(case["paraphrase_prompts"]),
                       locality=tuple(case["neighborhood_prompts"]))


def known_cases(model, tokenizer, cases: list[dict]) -> list[dict]:
    """Cases whose true object's first token is the unedited model's greedy prediction."""
    reqs = [request_of(c) for c in cases]
    preds = top1(model, tokenizer, [r.prompt for r in reqs])
    firsts = [target_token_ids(tokenizer, r.prompt, r.target_true)[0] for r in reqs]
    return [c for c, p, f in zip(cases, preds, firsts) if p == f]


def score_case(model, tokenizer, req: EditRequest, locality_before: list[int]) -> dict[str, float]:
    rel = token_em(model, tokenizer, [req.prompt], [req.target_new])[0]
    gen = token_em(model, tokenizer, list(req.paraphrases), [req.target_new] * len(req.paraphrases))
    after = top1(model, tokenizer, list(req.locality))
    loc = sum(a == b for a, b in zip(after, locality_before)) / len(after)
    return {"reliability": rel, "generalization": sum(gen) / len(gen), "locality": loc}


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def print_table(rows: list[dict], columns: list[str]) -> None:
    print("| " + " | ".join(columns) + " |")
    print("|" + "---|" * len(columns))
    for r in rows:
        print("| " + " | ".join(_fmt(r.get(c)) for c in columns) + " |")


def _fmt(v) -> str:
    return f"{v:.3f}" if isinstance(v, float) else str(v)


def setup_threads(n: int = 2) -> None:
    torch.set_num_threads(n)


def editable_default_model(threads: int = 2):
    """(editable embedded model, tokenizer) with the benchmarks' thread count."""
    import editpeft
    setup_threads(threads)
    model, tok = editpeft.load_default_model()
    return editpeft.enable_editing(model, tok), tok
