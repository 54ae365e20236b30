"""The fuzzing suite's numbers: mutations per adapter shape by outcome, time and peak memory.

Runs :func:`editpeft.fuzzing.fuzz_adapter` on the same seven adapter shapes as
``tests/test_fuzz.py`` (tiny llama model) and prints a Markdown table.

    EDITPEFT_PROGRESS=0 python benchmarks/fuzz_report.py
"""
from __future__ import annotations

import logging
import sys
import tempfile
import time
from collections import Counter
from contextlib import ExitStack
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from common import setup_threads  # noqa: E402

import editpeft  # noqa: E402
from editpeft.fuzzing import fuzz_adapter  # noqa: E402
from editpeft.registry import registered  # noqa: E402
from editpeft.testing import DEFAULT_REQUEST, PROBES, make_tiny_model, tiny_tokenizer  # noqa: E402


def main() -> None:
    from test_fuzz import KINDS, _logit_bias
    from test_routers import ToySide
    from toy_methods import ToyPatch
    setup_threads()
    logging.disable(logging.WARNING)
    tok = tiny_tokenizer()
    rows, totals = [], Counter()
    with ExitStack() as stack, tempfile.TemporaryDirectory() as tmp:
        stack.enter_context(registered(ToyPatch, distribution="tests"))
        stack.enter_context(registered(ToySide, distribution="tests"))
        stack.enter_context(registered(_logit_bias(), distribution="tests"))
        for method, config in KINDS.items():
            model = editpeft.enable_editing(make_tiny_model("llama", tok), tok)
            folder = Path(tmp) / method
            model.add_edit(method, DEFAULT_REQUEST, name="o", config=config).save_pretrained(folder)
            model.remove_edit("o")
            start = time.perf_counter()
            report = fuzz_adapter(model, folder, PROBES)
            seconds = time.perf_counter() - start
            by_cat = Counter((o.category, o.result) for o in report.outcomes)
            counts = report.counts()
            totals.update(counts)
            slowest = report.slowest()
            rows.append((method, len(report.outcomes), counts.get("refused", 0), counts.get("accepted-by-design", 0),
                         counts.get("FAILED", 0), " ".join(f"{c}:{by_cat[(c, 'refused')]}/{by_cat[(c, 'accepted-by-design')]}"
                                                           for c in ("config", "tensors", "files", "card")),
                         seconds, slowest.seconds * 1000, max(o.peak_bytes for o in report.outcomes) / 2**20))
            for o in report.failures:
                print(f"FAILED {method}: {o.mutation}: {o.detail}")
    print("| adapter | mutations | refused | accepted by design | failed | by category (refused/accepted) "
          "| seconds | slowest load (ms) | peak Python memory (MiB) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r[0]} | {r[1]} | {r[2]} | {r[3]} | {r[4]} | {r[5]} | {r[6]:.1f} | {r[7]:.0f} | {r[8]:.1f} |")
    print(f"| **all** | {sum(r[1] for r in rows)} | {totals['refused']} | {totals['accepted-by-design']} | "
          f"{totals['FAILED']} | | {sum(r[6] for r in rows):.1f} | | |")


if __name__ == "__main__":
    main()
