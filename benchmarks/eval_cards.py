"""Evaluate every installed method on the embedded model with fixed settings; write the measured
results (date, command, case counts) into the ``results:`` block of each method's card.

    python benchmarks/eval_cards.py                       # all methods, all settings below
    python benchmarks/eval_cards.py --methods grace --settings cf-single zsre-single
    python benchmarks/eval_cards.py --methods rome --settings zsre-single zsre-sequential --n 50

Runs resume: start the same command again after an interruption and it continues.
Results go to runs/cards/<setting>/<method>/ and runs/cards/report.md.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import re
import sys
from pathlib import Path

import torch
import yaml
from common import COUNTERFACT, DATA, editable_default_model

import editpeft
from editpeft.cards import card_path
from editpeft.evaluation import EvalCase, evaluate, load_cases, write_report

ZSRE = DATA / "portability" / "zsre_one_hop.json"
ZSRE_ALIAS = DATA / "portability" / "zsre_subject_replace.json"
ZSRE_TEST = DATA / "zsre" / "knowedit_zsre_test_all.json"
COUNTERFACT_EDIT = DATA / "counterfact" / "easyedit_counterfact_edit.json"
SETTINGS = {
    "cf-single": dict(data=COUNTERFACT, known_only=True, n=None, mode="single"),
    "cf-batch": dict(data=COUNTERFACT, known_only=True, n=None, mode="batch", batch_size=100),
    # the reference toolkit's protocol: the first paraphrase and the first neighbourhood prompt only
    "cf-single-first": dict(data=COUNTERFACT, known_only=True, n=None, mode="single", first_probes=True),
    "cf-sequential": dict(data=COUNTERFACT, known_only=True, n=None, mode="sequential", checkpoints=[1, 10, 50, 100]),
    # the scale: facts the model need not know (only 47 of 1129 CounterFact facts are known to a 135M model)
    "cf-batch100": dict(data=COUNTERFACT, known_only=False, n=100, mode="batch", batch_size=100),
    # 100 edits appended in batches of 10, every edit so far scored after each batch
    "cf-seq100": dict(data=COUNTERFACT, known_only=False, n=100, mode="sequential", batch_size=10,
                      checkpoints=list(range(10, 101, 10))),
    "cf-seq500": dict(data=COUNTERFACT, known_only=False, n=500, mode="sequential", batch_size=50,
                      checkpoints=[50, 100, 150, 200, 250, 300, 350, 400, 450, 500]),
    # issue 12's lifelong scale: 1,000 edits one after another, every edit so far scored at 1/10/100/1,000
    "zsre-seq1000": dict(data=ZSRE_TEST, known_only=False, n=1000, mode="sequential", batch_size=1,
                         checkpoints=[1, 10, 100, 1000]),
    "cf-seq1000": dict(data=COUNTERFACT_EDIT, known_only=False, n=1000, mode="sequential", batch_size=1,
                       checkpoints=[1, 10, 100, 1000]),
    "zsre-single": dict(data=ZSRE, known_only=False, n=200, mode="single"),
    # the survey's subject-alias portability: the edit must carry over to another name of the subject
    "zsre-alias": dict(data=ZSRE_ALIAS, known_only=False, n=100, mode="single"),
    # issue 13: 200 edits in one memory (one batch: SERAC's and IKE's memory holds them all at once)
    "zsre-memory200": dict(data=ZSRE, known_only=False, n=200, mode="batch", batch_size=200),
    "zsre-sequential": dict(data=ZSRE, known_only=False, n=100, mode="sequential", checkpoints=[1, 10, 50, 100]),
}
def first_probes(cases: list[EvalCase]) -> list[EvalCase]:
    """The cases with only their first generalization probe and first probe of each locality kind."""
    return [dataclasses.replace(c, generalization=c.generalization[:1],
                                locality={k: v[:1] for k, v in c.locality.items()}) for c in cases]


KEEP = ("reliability", "generalization", "locality", "locality_answer", "portability")


def _compact(summary: dict) -> dict:
    m = summary["metrics"]
    out = {"cases": summary["counts"].get("scored"), "failed_edits": summary["failed_edits"]}
    if summary["settings"].get("known_only"):
        out["known_of_examined"] = f"{summary['counts'].get('kept')} of {summary['counts'].get('examined')}"
    for metric in KEEP:
        for protocol in ("token_em", "prob_margin", "gen_em"):
            if protocol in m.get(metric, {}):
                out[f"{metric}_{protocol}"] = round(m[metric][protocol]["mean"], 3)
    e = summary["efficiency"]
    out["median_seconds_per_edit"] = round(e.get("edit_seconds_median", float("nan")), 2)
    out["adapter_bytes"] = int(e.get("adapter_bytes", 0))
    out["peak_memory_mb"] = round(e.get("peak_memory_mb", 0))
    if summary.get("curve"):       # sequential: the scores, size and memory at every checkpoint
        c = summary["curve"]
        out["curve"] = {"edits": [p["edits"] for p in c],
                        **{f"{metric}_token_em": [round(p["metrics"].get(metric, {}).get("token_em", {}).get(
                            "mean", float("nan")), 3) for p in c] for metric in ("reliability", "generalization",
                                                                                 "locality")},
                        "adapter_bytes": [int(p.get("adapter_bytes", 0)) for p in c],
                        "peak_memory_mb": [round(p.get("peak_memory_mb", 0)) for p in c]}
    return out


class _CardDumper(yaml.SafeDumper):
    """Block style, but each list (a curve's series) on one line."""


_CardDumper.add_representer(list, lambda d, v: d.represent_sequence("tag:yaml.org,2002:seq", v, flow_style=True))


def write_card_results(path: Path, block: dict) -> None:
    """Replace the card's top-level ``results:`` block (comments elsewhere are kept)."""
    text = path.read_text()
    new = yaml.dump({"results": block}, Dumper=_CardDumper, sort_keys=False, width=110)
    pattern = re.compile(r"^results:\n(?:[ #].*\n|\n)*", re.M)
    text = pattern.sub(new, text) if pattern.search(text) else text.rstrip("\n") + "\n" + new
    path.write_text(text)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--methods", nargs="*", help="default: every installed method")
    ap.add_argument("--settings", nargs="*", default=list(SETTINGS), choices=list(SETTINGS))
    ap.add_argument("--out", default="runs/cards")
    ap.add_argument("--no-write", action="store_true", help="do not touch the cards")
    ap.add_argument("--n", type=int, help="override the number of cases of the chosen settings (runs go to "
                                           "<setting>-n<N>/; the card records the count)")
    ap.add_argument("--editor", action="append", default=[], metavar="METHOD=PATH",
                    help="the trained editor (folder or Hub repo id) of a method that edits with one, e.g. "
                         "ike=editors/ike (repeatable)")
    ap.add_argument("--config", action="append", default=[], metavar="METHOD=JSON",
                    help="override some of a method's card hyper-parameters, e.g. 'melo={\"replay\": false}'; "
                         "runs go to <setting>-<method>-<override>/ and the card's result records the override")
    args = ap.parse_args()
    editors = dict(e.split("=", 1) for e in args.editor)
    overrides = {m: json.loads(c) for m, c in (x.split("=", 1) for x in args.config)}
    model, tok = editable_default_model()
    methods = args.methods or sorted(editpeft.list_methods())
    out = Path(args.out)
    results: dict[str, dict] = {m: {} for m in methods}
    folders = []
    for name in args.settings:
        s = dict(SETTINGS[name])
        folder = out / name
        if args.n is not None:
            s["n"], folder = args.n, out / f"{name}-n{args.n}"
        if overrides:
            label = "-".join(f"{m}-{json.dumps(c, sort_keys=True)}" for m, c in sorted(overrides.items()))
            folder = folder.with_name(f"{folder.name}-{re.sub(r'[^A-Za-z0-9.]+', '-', label).strip('-')}")
        folders.append(folder)
        data = s.pop("data")
        if s.pop("first_probes", False):
            data = first_probes(load_cases(data))
        config = {m: overrides[m] for m in overrides if m in methods}    # dicts start from the card
        summaries = evaluate(model, tok, methods, data, out=folder, editors=editors, config=config or None, **s)
        for method, summary in summaries.items():
            results[method][name] = {**_compact(summary), **({"config_override": overrides[method]}
                                                              if method in overrides else {})}
    write_report(folders, out)
    print((out / "report.md").read_text())
    if args.no_write:
        return
    for method in methods:
        path = card_path(method, model.config.model_type)
        if path is None:
            print(f"no card for {method}/{model.config.model_type}; results not written", file=sys.stderr)
            continue
        threads = torch.get_num_threads()
        earlier = (yaml.safe_load(Path(path).read_text()) or {}).get("results") or {}
        kept = {k: v for k, v in earlier.items() if k in SETTINGS and k not in results[method]}
        block = {"date": datetime.date.today().isoformat(),
                 "command": "python benchmarks/eval_cards.py (settings as in SETTINGS there; runs merged per setting)",
                 "machine": f"{threads} CPU thread(s) for the latest settings, no GPU, float32, embedded "
                            "SmolLM2-135M-Instruct",
                 "protocols": "token_em, prob_margin, gen_em (see editpeft/evaluation/metrics.py)",
                 **kept, **results[method]}
        write_card_results(Path(path), block)
        print(f"wrote results to {path}")


if __name__ == "__main__":
    main()
