"""Bytes moved by a Hub push + pull of a ROME adapter (loopback server, real huggingface_hub
client), and the time to load an adapter from the local HF cache onto a loaded model.

    python benchmarks/hub_roundtrip.py --loads 20
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

from common import editable_default_model, print_table

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from hub_server import LoopbackHub  # noqa: E402

from editpeft import EditRequest  # noqa: E402
from editpeft.models import converted_model_dir  # noqa: E402

REQ = EditRequest(prompt="The Eiffel Tower is located in the city of", subject="Eiffel Tower",
                  target_new="Rome", target_true="Paris")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--loads", type=int, default=20)
    args = ap.parse_args()
    from huggingface_hub import constants
    model, tok = editable_default_model()
    adapter = model.add_edit("rome", REQ, name="eiffel")
    model.remove_edit("eiffel")
    with LoopbackHub() as hub, tempfile.TemporaryDirectory() as cache:
        constants.ENDPOINT = hub.endpoint
        constants.HUGGINGFACE_CO_URL_TEMPLATE = hub.endpoint + "/{repo_id}/resolve/{revision}/{filename}"
        constants.HF_HUB_CACHE = cache
        constants.HF_HUB_OFFLINE = False
        import os
        os.environ.setdefault("HF_TOKEN", "hf_loopback")
        adapter.push_to_hub("bench/eiffel")
        pushed = hub.bytes_in
        t0 = time.perf_counter()
        model.load_edit("bench/eiffel")        # first pull: downloads into the clean cache
        first = time.perf_counter() - t0
        pulled = hub.bytes_out
        model.remove_edit("eiffel")
        constants.HF_HUB_OFFLINE = True        # later loads: from the local cache only
        times = []
        for _ in range(args.loads):
            t0 = time.perf_counter()
            model.load_edit("bench/eiffel")
            times.append(time.perf_counter() - t0)
            model.remove_edit("eiffel")
    model_bytes = sum(p.stat().st_size for p in Path(converted_model_dir()).glob("*.safetensors"))
    rows = [{"pushed bytes": pushed, "pulled bytes": pulled, "total": pushed + pulled,
             "model safetensors bytes": model_bytes, "ratio": f"1:{model_bytes / (pushed + pulled):,.0f}",
             "first load s (download)": first, "cached load s (median)": statistics.median(times),
             "cached load s (max)": max(times)}]
    print_table(rows, list(rows[0]))


if __name__ == "__main__":
    main()
