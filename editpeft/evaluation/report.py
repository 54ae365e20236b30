"""Summaries, Markdown tables and plots of evaluation runs; shards of one run are merged.

Every number keeps its protocol: summaries are ``metrics[metric][protocol] = {"mean", "n"}``, each
Markdown table is one protocol (named in its heading), plots are titled with theirs.

Example:
    >>> write_report(["runs/cf/rome", "runs/cf/grace"], "runs/cf")   # doctest: +SKIP
    'runs/cf/report.md'
"""
from __future__ import annotations

import json
import os
import statistics
from collections import defaultdict
from pathlib import Path
from typing import Any, Iterable, Sequence

from ..errors import EditError

HEADLINE = ("reliability", "generalization", "locality", "locality_answer", "portability", "fluency")
PROTOCOL_ORDER = ("token_em", "prob_margin", "gen_em", "ngram_entropy")


def _dedupe(lines: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """The last line per (checkpoint, case): a case rescored after an interruption counts once."""
    last: dict[tuple, dict[str, Any]] = {}
    for ln in lines:
        last[(ln.get("checkpoint"), ln.get("failed_at"), ln["case_id"])] = ln
    return list(last.values())


def _means(lines: Sequence[dict[str, Any]]) -> dict[str, dict[str, dict[str, float]]]:
    acc: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for ln in lines:
        for metric, by_protocol in (ln.get("scores") or {}).items():
            for protocol, value in by_protocol.items():
                acc[metric][protocol].append(value)
    return {m: {p: {"mean": sum(v) / len(v), "n": len(v)} for p, v in sorted(ps.items())}
            for m, ps in sorted(acc.items())}


def _seconds(values: list[float]) -> dict[str, float]:
    if not values:
        return {}
    return {"edit_seconds_mean": sum(values) / len(values), "edit_seconds_median": statistics.median(values)}


def summarize(lines: Iterable[dict[str, Any]], settings: dict[str, Any] | None = None,
              counts: dict[str, int] | None = None) -> dict[str, Any]:
    """The summary of a run's case lines (see the module docstring for its shape)."""
    lines = _dedupe(lines)
    settings = settings or {}
    failed = [ln for ln in lines if ln.get("error")]
    memory = max((ln.get("peak_memory_mb", 0.0) for ln in lines), default=0.0)
    out: dict[str, Any] = {"settings": settings, "counts": dict(counts or {}), "failed_edits": len(failed)}
    if settings.get("mode") == "sequential":
        complete = sorted({ln["checkpoint"] for ln in lines if ln.get("checkpoint_complete")})
        curve = []
        seconds: list[float] = [ln["edit_seconds"] for ln in failed]
        elapsed = 0.0
        for k in complete:
            at_k = [ln for ln in lines if ln.get("checkpoint") == k]
            since = [s for ln in at_k for s in ln.get("edit_seconds_since_last_checkpoint", [])]
            seconds.extend(since)
            elapsed += sum(since)
            curve.append({"edits": k, "scored": sum(1 for ln in at_k if ln.get("scores")), "metrics": _means(at_k),
                          "edit_seconds_total": round(elapsed, 3),
                          "adapter_bytes": max(ln.get("adapter_bytes", 0) for ln in at_k),
                          "peak_memory_mb": max(ln.get("peak_memory_mb", 0.0) for ln in at_k),
                          "kept_states_mb": max(ln.get("kept_states_mb", 0.0) for ln in at_k)})
        out["curve"] = curve
        out["metrics"] = curve[-1]["metrics"] if curve else {}
        out["counts"]["scored"] = complete[-1] if complete else 0
        out["efficiency"] = {**_seconds(seconds), "adapter_bytes": curve[-1]["adapter_bytes"] if curve else 0,
                             "peak_memory_mb": memory}
    else:
        scored = [ln for ln in lines if ln.get("scores")]
        out["metrics"] = _means(scored)
        out["counts"]["scored"] = len(scored)
        sizes = [ln["adapter_bytes"] for ln in scored if "adapter_bytes" in ln]
        out["efficiency"] = {**_seconds([ln["edit_seconds"] for ln in lines if "edit_seconds" in ln]),
                             "adapter_bytes": sum(sizes) / len(sizes) if sizes else 0, "peak_memory_mb": memory}
    return out


# -- merging runs and shards ------------------------------------------------------------------------

def _read_run(path: Path) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    run_json = path / "run.json"
    if not run_json.is_file():
        raise EditError(f"{path} is not an evaluation run folder (no run.json); pass OUT/<method> folders "
                        "or the OUT folder that holds them")
    meta = json.loads(run_json.read_text())
    lines = []
    if (path / "cases.jsonl").is_file():
        for text in (path / "cases.jsonl").read_text().splitlines():
            try:
                lines.append(json.loads(text))
            except json.JSONDecodeError:
                break
    return meta, lines


def run_folders(paths: Iterable[str | os.PathLike]) -> list[Path]:
    """Method run folders under the given paths (a path may be a run folder or hold several)."""
    found: list[Path] = []
    for p in map(Path, paths):
        if (p / "run.json").is_file():
            found.append(p)
        elif p.is_dir():
            found.extend(sorted(q.parent for q in p.rglob("run.json")))
    if not found:
        raise EditError(f"no evaluation runs under {[str(p) for p in paths]}")
    return list(dict.fromkeys(found))


def combine(paths: Iterable[str | os.PathLike]) -> dict[str, dict[str, Any]]:
    """Summaries keyed by a run label; shards of one run (same settings but the shard) are merged."""
    groups: dict[str, dict[str, Any]] = {}
    for folder in run_folders(paths):
        meta, lines = _read_run(folder)
        s = dict(meta["settings"])
        shard = s.pop("shard", [0, 1])
        key = json.dumps(s, sort_keys=True)
        g = groups.setdefault(key, {"settings": s, "lines": [], "shards": set(), "kept": 0})
        if tuple(shard) in g["shards"]:
            raise EditError(f"{folder}: shard {shard[0]}/{shard[1]} of this run was given twice")
        g["shards"].add(tuple(shard))
        g["lines"].extend(lines)
        kept = len(meta.get("case_ids", []))     # sequential shards all keep the whole stream
        g["kept"] = max(g["kept"], kept) if s.get("mode") == "sequential" else g["kept"] + kept
        if (folder / "summary.json").is_file():
            counts = json.loads((folder / "summary.json").read_text()).get("counts", {})
            g["examined"] = g.get("examined", 0) + counts.get("examined", 0)
    out = {}
    for g in groups.values():
        s = g["settings"]
        label = f"{s['method']} ({s['mode']}, {Path(s.get('data') or 'cases').stem})"
        while label in out:
            label += "'"
        counts = {"kept": g["kept"], "shards": len(g["shards"])}
        if g.get("examined"):
            counts["examined"] = g["examined"]
        out[label] = summarize(g["lines"], settings={**s, "shard": [0, 1]}, counts=counts)
    return out


# -- tables and plots ----------------------------------------------------------------------------------

def _columns(summaries: dict[str, dict[str, Any]], protocol: str) -> list[str]:
    present = {m for s in summaries.values() for m, ps in s["metrics"].items() if protocol in ps}
    head = [m for m in HEADLINE if m in present]
    return head + sorted(m for m in present if m not in head)


def markdown(summaries: dict[str, dict[str, Any]]) -> str:
    """One table per protocol (methods × metrics) plus an efficiency table."""
    parts = ["# Evaluation report", ""]
    for label, s in summaries.items():
        c = s["counts"]
        st = s["settings"]
        parts.append(f"- **{label}**: {c.get('scored', 0)} cases scored of {c.get('kept', '?')} kept"
                     + (f" (known-only: {c['kept']} of {c['examined']} examined)" if st.get("known_only")
                        and "examined" in c else "")
                     + f"; {s['failed_edits']} failed edits; data `{st.get('data', '')}` ({st.get('format', '')})")
    protocols = [p for p in PROTOCOL_ORDER if any(p in ps for s in summaries.values() for ps in s["metrics"].values())]
    for protocol in protocols:
        cols = _columns(summaries, protocol)
        parts += ["", f"## Protocol `{protocol}`", "", "| run | " + " | ".join(cols) + " |",
                  "|---|" + "---|" * len(cols)]
        for label, s in summaries.items():
            cells = [f"{s['metrics'][m][protocol]['mean']:.3f}" if protocol in s["metrics"].get(m, {}) else "–"
                     for m in cols]
            parts.append(f"| {label} | " + " | ".join(cells) + " |")
    parts += ["", "## Efficiency", "", "| run | s/edit (mean) | s/edit (median) | adapter bytes | peak memory MiB |",
              "|---|---|---|---|---|"]
    for label, s in summaries.items():
        e = s["efficiency"]
        parts.append(f"| {label} | {e.get('edit_seconds_mean', float('nan')):.2f} | "
                     f"{e.get('edit_seconds_median', float('nan')):.2f} | {e.get('adapter_bytes', 0):,.0f} | "
                     f"{e.get('peak_memory_mb', 0):,.0f} |")
    curves = {label: s["curve"] for label, s in summaries.items() if s.get("curve")}
    for label, curve in curves.items():
        parts += ["", f"## Sequential: {label}", "", "| edits | scored | " + " | ".join(
            f"{m} ({p})" for m in ("reliability", "generalization", "locality") for p in ("token_em",))
            + " | edit s (total) | adapter bytes | peak MiB |", "|---|---|---|---|---|---|---|---|"]
        for point in curve:
            cells = [f"{point['metrics'].get(m, {}).get('token_em', {}).get('mean', float('nan')):.3f}"
                     for m in ("reliability", "generalization", "locality")]
            parts.append(f"| {point['edits']} | {point.get('scored', point['edits'])} | " + " | ".join(cells)
                         + f" | {point.get('edit_seconds_total', float('nan')):.1f} | {point['adapter_bytes']:,}"
                         f" | {point['peak_memory_mb']:,.0f} |")
    return "\n".join(parts) + "\n"


def plot(summaries: dict[str, dict[str, Any]], out_dir: Path) -> list[Path]:
    """Bar charts per protocol and, for sequential runs, score-versus-edits curves (PNG)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    for protocol in PROTOCOL_ORDER[:3]:
        cols = [m for m in _columns(summaries, protocol) if "/" not in m]
        if not cols:
            continue
        fig, ax = plt.subplots(figsize=(1.6 * len(cols) + 2, 3.6))
        width = 0.8 / max(1, len(summaries))
        for i, (label, s) in enumerate(summaries.items()):
            vals = [s["metrics"].get(m, {}).get(protocol, {}).get("mean", 0.0) for m in cols]
            ax.bar([j + i * width for j in range(len(cols))], vals, width, label=label)
        ax.set_xticks([j + width * (len(summaries) - 1) / 2 for j in range(len(cols))], cols)
        ax.set_ylim(0, 1.05)
        ax.set_title(f"protocol: {protocol}")
        ax.legend(fontsize="small")
        fig.tight_layout()
        path = out_dir / f"bars_{protocol}.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        written.append(path)
    curves = {label: s["curve"] for label, s in summaries.items() if s.get("curve")}
    if curves:
        metrics = ("reliability", "generalization", "locality")
        fig, axes = plt.subplots(1, 3, figsize=(12, 3.6), sharey=True)
        for ax, metric in zip(axes, metrics):
            for label, curve in curves.items():
                xs = [p["edits"] for p in curve]
                ys = [p["metrics"].get(metric, {}).get("token_em", {}).get("mean", float("nan")) for p in curve]
                ax.plot(xs, ys, marker="o", label=label)
            ax.set_xscale("log")
            ticks = sorted({p["edits"] for curve in curves.values() for p in curve})
            ax.set_xticks(ticks, [str(t) for t in ticks])
            ax.xaxis.set_minor_formatter(plt.NullFormatter())
            ax.set_xlabel("number of edits")
            ax.set_title(f"{metric} (token_em)")
            ax.set_ylim(0, 1.05)
        axes[0].legend(fontsize="small")
        fig.tight_layout()
        path = out_dir / "sequential_token_em.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        written.append(path)
    return written


def write_report(paths: Iterable[str | os.PathLike], out_dir: str | os.PathLike) -> Path:
    """Combine runs (merging shards) into ``summary.json``, ``report.md`` and PNG plots in ``out_dir``."""
    summaries = combine(paths)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "summary.json").write_text(json.dumps(summaries, indent=2))
    report = out_dir / "report.md"
    report.write_text(markdown(summaries))
    plot(summaries, out_dir)
    return report
