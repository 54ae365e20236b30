"""Durability figures: memory per GRACE entry over 1,000 appends, file handles and memory over
200 save/load cycles, concurrent writers and a concurrent reader on one adapter folder.

    EDITPEFT_PROGRESS=0 python benchmarks/durability.py [--appends 1000] [--cycles 200]

Prints a Markdown table. RSS is read from /proc/self/statm (Linux); "per entry" is the growth
divided by the number of entries, next to the codebook's own bytes per entry.
"""
from __future__ import annotations

import argparse
import gc
import logging
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from common import setup_threads

import editpeft
from editpeft import EditRequest
from editpeft.io import read_adapter_files
from editpeft.loading import load_adapter
from editpeft.testing import make_tiny_model, tiny_tokenizer

WORDS = ["tower", "river", "gold", "silver", "city", "Berlin", "London", "Madrid", "Tokyo", "Vienna"]
GRACE = {"layer": 0, "eps_init": 1.0, "steps": 3}


def rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def request(i: int) -> EditRequest:
    return EditRequest(prompt=f"Fact {i}: the {WORDS[i % 10]} of {WORDS[(i // 10) % 10]} and {WORDS[(i // 100) % 10]} is",
                       target_new=WORDS[(i + 3) % 10])


def grace_appends(model, n: int) -> dict:
    model.add_edit("grace", request(0), name="mem", config=GRACE)
    gc.collect()
    start_rss, start = rss(), time.perf_counter()
    for i in range(1, n):
        model.add_edit("grace", request(i), name="mem", append=True)
    gc.collect()
    seconds, grown = time.perf_counter() - start, rss() - start_rss
    adapter = model.edits["mem"]
    book = adapter.num_bytes() / len(adapter.codebook)
    model.remove_edit("mem")
    return {"entries": len(adapter.codebook), "requests": len(adapter.requests), "seconds": seconds,
            "rss_per_entry": grown / n, "codebook_per_entry": book}


def save_load_cycles(model, n: int, folder: Path) -> dict:
    adapter = model.add_edit("grace", request(0), name="g", config=GRACE)
    adapter.save_pretrained(folder)
    load_adapter(folder)
    gc.collect()
    fd0, rss0, start = fds(), rss(), time.perf_counter()
    for _ in range(n):
        adapter.save_pretrained(folder)
        adapter = load_adapter(folder)
    gc.collect()
    model.remove_edit("g")
    return {"cycles": n, "seconds": time.perf_counter() - start, "fd_delta": fds() - fd0, "rss_delta": rss() - rss0}


_WRITER = """
import sys
from editpeft.loading import load_adapter
adapter, failures = load_adapter(sys.argv[1]), 0
for _ in range(int(sys.argv[3])):
    try:
        adapter.save_pretrained(sys.argv[2])
    except Exception as e:
        failures += 1
        print(repr(e), file=sys.stderr)
print(failures)
"""


def concurrent(model, root: Path, saves: int) -> dict:
    model.add_edit("grace", request(1), name="a", config=GRACE).save_pretrained(root / "a")
    model.add_edit("grace", request(2), name="b", config=GRACE).save_pretrained(root / "b")
    model.remove_edit("a")
    model.remove_edit("b")
    (root / "a").rename(root / "src-a")
    (root / "b").rename(root / "src-b")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "EDITPEFT_PROGRESS": "0"}
    target = root / "shared"
    stop, reads, read_failures = threading.Event(), [0], [0]
    load_adapter(root / "src-a").save_pretrained(target)

    def reader() -> None:
        while not stop.is_set():
            try:
                read_adapter_files(target)
                reads[0] += 1
            except Exception:   # noqa: BLE001 (counted)
                read_failures[0] += 1
    thread = threading.Thread(target=reader)
    thread.start()
    start = time.perf_counter()
    procs = [subprocess.Popen([sys.executable, "-c", _WRITER, str(root / src), str(target), str(saves)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
             for src in ("src-a", "src-b")]
    results = [p.communicate() for p in procs]
    seconds = time.perf_counter() - start
    stop.set()
    thread.join()
    write_failures = sum(int(out.strip() or 0) for out, _ in results) + sum(p.returncode != 0 for p in procs)
    final_ok = True
    try:
        read_adapter_files(target)
    except Exception:   # noqa: BLE001 (reported)
        final_ok = False
    return {"saves": 2 * saves, "write_failures": write_failures, "reads": reads[0], "read_failures": read_failures[0],
            "final_whole": final_ok, "seconds": seconds}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--appends", type=int, default=1000)
    ap.add_argument("--cycles", type=int, default=200)
    ap.add_argument("--saves", type=int, default=200, help="saves per writer process")
    args = ap.parse_args()
    setup_threads()
    logging.disable(logging.WARNING)
    tok = tiny_tokenizer()
    model = editpeft.enable_editing(make_tiny_model("llama", tok), tok)
    with tempfile.TemporaryDirectory() as tmp:
        g = grace_appends(model, args.appends)
        c = save_load_cycles(model, args.cycles, Path(tmp) / "cycle")
        w = concurrent(model, Path(tmp), args.saves)
    print("| check | size | seconds | result |")
    print("|---|---|---|---|")
    print(f"| GRACE appends, tiny llama (d=64->32) | {g['entries']} entries / {g['requests']} requests | "
          f"{g['seconds']:.1f} | RSS growth {g['rss_per_entry'] / 1024:.2f} KiB per entry (codebook tensors "
          f"{g['codebook_per_entry']:.0f} B per entry; the rest is the stored requests and allocator slack) |")
    print(f"| save -> load cycles | {c['cycles']} | {c['seconds']:.1f} | open files {c['fd_delta']:+d}, RSS "
          f"{c['rss_delta'] / 2**20:+.1f} MiB |")
    print(f"| two processes saving to one folder + a reader thread | {w['saves']} saves, {w['reads']} reads | "
          f"{w['seconds']:.1f} | {w['write_failures']} failed saves, {w['read_failures']} failed reads, final folder "
          f"{'one whole adapter' if w['final_whole'] else 'BROKEN'} |")


if __name__ == "__main__":
    main()
