"""Score-versus-edits curves of sequential runs, with points recorded in other methods' cards.

    python benchmarks/plot_sequential.py runs/cards/cf-seq100 --card alphaedit \\
        --out ../docs/results/sequential_cf100_batches10.png
    python benchmarks/plot_sequential.py runs/cards/zsre-seq1000 --card grace:zsre-sequential --log-x \\
        --out ../docs/results/lifelong_zsre1000.png

Curves come from the harness's run folders (``<folder>/<method>/`` of ``eval_cards.py``
sequential settings); ``--card M`` adds the points of M's card — the ``results.<setting>.curve``
that ``eval_cards.py`` writes for a sequential setting when ``--setting`` (or ``--card M:SETTING``) names one, else the
``sequential:`` block (``{metric: [score at each checkpoint]}`` with the checkpoints named by
``checkpoints``) — drawn dashed since they come from another run. Prints the table it plots.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import matplotlib
import yaml

from editpeft.cards import card_path
from editpeft.evaluation.report import combine

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

METRICS = ("reliability", "generalization", "locality")


def run_curves(folder: Path) -> dict[str, list[tuple[int, dict[str, float]]]]:
    out = {}
    for method, summary in combine(sorted(p for p in folder.iterdir() if p.is_dir())).items():
        out[method.split(" (")[0]] = [(p["edits"], {m: p["metrics"][m]["token_em"]["mean"] for m in METRICS if m in p["metrics"]})
                       for p in summary.get("curve") or []]
    return out


def card_points(method: str, model_type: str, setting: str | None = None) -> list[tuple[int, dict[str, float]]]:
    """Points from M's card: the curve of ``results.<setting>`` (what ``eval_cards.py`` writes for a
    sequential setting; its final point alone for results written before curves were kept) when a
    setting is named, else the hand-written ``sequential:`` block."""
    card = yaml.safe_load(Path(card_path(method, model_type)).read_text()) or {}
    if setting:
        result = (card.get("results") or {}).get(setting)
        if not result:
            raise SystemExit(f"{method}'s card has no results.{setting}")
        curve = result.get("curve")
        if curve:
            return [(n, {m: curve[f"{m}_token_em"][i] for m in METRICS if f"{m}_token_em" in curve})
                    for i, n in enumerate(curve["edits"])]
        # a result written before curves were kept: its final point only
        return [(result["cases"], {m: result[f"{m}_token_em"] for m in METRICS if f"{m}_token_em" in result})]
    block = card.get("sequential") or {}
    scores, checkpoints = block.get(method) or {}, block.get("checkpoints") or []
    return [(n, {m: scores[m][i] for m in METRICS if m in scores}) for i, n in enumerate(checkpoints)]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("folders", nargs="*", type=Path)
    ap.add_argument("--card", nargs="*", default=[],
                    help="methods whose card's sequential points are added; METHOD:SETTING reads that setting's curve")
    ap.add_argument("--model-type", default="llama")
    ap.add_argument("--setting", help="read card curves from results.<setting> (e.g. zsre-seq1000) where present")
    ap.add_argument("--log-x", action="store_true", help="logarithmic edit axis (checkpoints such as 1/10/100/1000)")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    curves = {}
    for folder in args.folders:
        curves.update(run_curves(folder))
    named = [(c.split(":", 1) + [args.setting])[:2] for c in args.card]
    dashed = {f"{m} (card{', ' + st if st else ''})": card_points(m, args.model_type, st) for m, st in named}
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.6), sharey=True)
    for ax, metric in zip(axes, METRICS):
        for label, points in [*curves.items(), *dashed.items()]:
            xs = [n for n, s in points if metric in s]
            ax.plot(xs, [s[metric] for n, s in points if metric in s], marker="o", label=label,
                    linestyle="--" if label in dashed else "-")
        ax.set_xlabel("edits so far")
        if args.log_x:
            ax.set_xscale("log")
        ax.set_title(f"{metric} (token_em)")
        ax.set_ylim(0, 1.05)
    axes[0].legend(fontsize="small")
    fig.tight_layout()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=100)
    print("| method | edits | " + " | ".join(METRICS) + " |\n|---|---|---|---|---|")
    for label, points in [*curves.items(), *dashed.items()]:
        for n, s in points:
            print(f"| {label} | {n} | " + " | ".join(f"{s.get(m, float('nan')):.3f}" for m in METRICS) + " |")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
