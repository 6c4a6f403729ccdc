"""Peak memory of `fruitnet check` on many near-identical photos (issue 19, item 2).

    .venv/bin/python bench/bench_scan_memory.py [--sizes 1000 4000 20000] [--out bench/results/scan-memory.md]
                                                [--src DIR --label NAME]

For each size N, writes N 64x64 PNGs into one class folder, each the same picture with one pixel
changed (plus 10 ordinary photos in a second class: check needs two), runs `fruitnet check DIR
--json` as a user does, and reports the child's peak resident memory (ru_maxrss), its time and the
largest group it found.  Every pair of such photos is a near-duplicate pair: N^2/2 of them, which
the code before issue 19 kept in Python lists (4,000 photos: MemoryError at 5.3 GB).  --src runs
another checkout's src/ folder instead (e.g. the old code, for comparison) and --label names it in
the table.  Appends a stamped section (machine, commit, command) to --out.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import REPO, machine, stamp, table  # noqa: E402


def write_photos(root: Path, n: int) -> int:
    """root/a/<n near-identical PNGs>, root/b/<10 others>; returns the bytes written."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:64, :64]
    base = (np.stack([yy * 3, xx * 3, (yy + xx) * 2], -1) + rng.integers(0, 24, (64, 64, 3))).astype(np.uint8)
    (root / "a").mkdir(parents=True)
    (root / "b").mkdir()
    for k in range(n):
        img = base.copy()
        img[k // 64 % 64, k % 64] = rng.integers(0, 256, 3)  # one pixel differs
        Image.fromarray(img).save(root / "a" / f"{k:06d}.png")
    for k in range(10):
        Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(root / "b" / f"{k}.png")
    return sum(p.stat().st_size for p in root.rglob("*.png"))


def run_check(data: Path, src: Path) -> dict:
    """`fruitnet check DATA --json` in a child process: its seconds, peak RSS (MB) and report."""
    env = {**os.environ, "PYTHONPATH": str(src)}
    t = time.perf_counter()
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        proc = subprocess.Popen([sys.executable, "-m", "fruitnet", "check", str(data), "--json"], stdout=out,
                                stderr=err, env=env)
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        seconds = time.perf_counter() - t
        out.seek(0)
        err.seek(0)
        text, errors = out.read().decode(), err.read().decode(errors="replace")
    result = {"seconds": seconds, "peak_mb": usage.ru_maxrss / 1024, "code": proc.returncode}
    if proc.returncode in (0, 1):
        result["largest_group"] = max(map(len, json.loads(text)["near_duplicates"]), default=0)
    else:
        result["error"] = errors.strip().splitlines()[-1] if errors.strip() else f"exit {proc.returncode}"
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000, 4000, 20000])
    parser.add_argument("--src", type=Path, default=REPO / "src", help="the fruitnet code to run (a src/ folder)")
    parser.add_argument("--label", default="this commit", help="what --src is, for the table")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "scan-memory.md")
    args = parser.parse_args()
    header = ["code", "near-identical photos", "files", "seconds", "peak memory (MB)",
              "largest near-duplicate group / error"]
    rows = []
    for n in args.sizes:
        with tempfile.TemporaryDirectory() as tmp:
            data = Path(tmp) / "photos"
            size = write_photos(data, n)
            r = run_check(data, args.src)
        rows.append([args.label, f"{n:,}", f"{size / 1e6:.1f} MB", f"{r['seconds']:.0f}", f"{r['peak_mb']:,.0f}",
                     r.get("largest_group", r.get("error"))])
        print(table(header, rows[-1:]), flush=True)
    section = (f"## `fruitnet check DIR --json` on N near-identical 64x64 PNGs ({args.label})\n\n"
               f"Machine: {machine()}\n\n{stamp()}\n\n"
               + table(header, rows) + "\n\n")
    with open(args.out, "a") as f:
        f.write(section)
    print(section)


if __name__ == "__main__":
    main()
