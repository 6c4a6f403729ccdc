"""Ctrl-C at random moments of a real `fruitnet train`, many times: every run must end with exit
130, one line saying what is kept and how to go on, and no traceback; a run whose folder holds
its config must then finish with --resume.

    .venv/bin/python scripts/stress_ctrl_c.py --runs 20

The tests hit each point of training deliberately (tests/test_interrupts.py); this is the stress
run beside them: SIGINT from outside, as a terminal sends it, at a random moment between the start
and the end of a default training on the bundled demo photos (Lite0, so a run takes seconds).
"""

from __future__ import annotations

import argparse
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TRAIN = [sys.executable, "-m", "fruitnet", "train", str(REPO / "src" / "fruitnet" / "demo_data" / "train"),
         "--backbone", "efficientnet_lite0"]


def one(run: Path, after: float) -> str:
    """Train into `run`, press Ctrl-C after `after` seconds; what happened, or an AssertionError."""
    proc = subprocess.Popen([*TRAIN, "--out", str(run)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(after)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=300)
    if proc.returncode == 0:
        return "finished before the Ctrl-C"
    assert proc.returncode == 130, f"exit {proc.returncode}: {err[-2000:]}"
    assert "Traceback" not in out + err, err[-2000:]
    if "nothing was written" in out or "fruitnet train: interrupted" in err:  # while scanning, or importing torch
        assert not run.exists(), f"{run} left behind"
        return "stopped before the run folder"
    assert f"continue with: fruitnet train --resume {run}" in out, out[-2000:]
    resumed = subprocess.run([sys.executable, "-m", "fruitnet", "train", "--resume", str(run)], capture_output=True,
                             text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    return "resumed to the end"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    rng = random.Random(args.seed)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        full = subprocess.run([*TRAIN, "--out", str(Path(tmp) / "whole")], capture_output=True, text=True)
        length = time.perf_counter() - start
        assert full.returncode == 0, full.stderr[-2000:]
        print(f"an uninterrupted run takes {length:.1f}s; Ctrl-C at a random moment within it, {args.runs} times",
              flush=True)
        outcomes = []
        for i in range(args.runs):
            after = rng.uniform(0.2, length)
            outcomes.append(one(Path(tmp) / f"run{i}", after))
            print(f"run {i + 1}: Ctrl-C after {after:.1f}s: {outcomes[-1]}", flush=True)
    finished = outcomes.count("finished before the Ctrl-C")
    print(f"{args.runs} runs in a row, none failed: {args.runs - finished} interrupted, each with exit 130, its line "
          f"and no traceback, then resumed or left nothing; {finished} finished before the Ctrl-C came")


if __name__ == "__main__":
    main()
