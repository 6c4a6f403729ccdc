"""What every benchmark prints: the machine, the commit and command, markdown tables, mean and spread."""

from __future__ import annotations

import os
import platform
import statistics
import subprocess
import sys
from datetime import datetime
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("FRUITNET_SHARED_DATA", REPO.parent / "shared" / "data"))
DEMO_DATA = REPO / "src" / "fruitnet" / "demo_data"


def machine() -> str:
    import torch

    from fruitnet.arithmetic import choose_arithmetic

    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    arith = choose_arithmetic("auto", torch.device("cpu"))
    gpu = f"GPU {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else "no GPU"
    return (f"{cpu}, {os.cpu_count()} cores, {gpu}, torch {torch.__version__}, Python {platform.python_version()}; "
            f"auto arithmetic: {arith.dtype} ({arith.reason}); load average {os.getloadavg()[0]:.1f} at the start")


def stamp() -> str:
    """The commit (with '+ uncommitted changes' when the tree is dirty), the command and the date."""
    def git(*args):
        return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True).stdout.strip()

    commit = git("rev-parse", "--short", "HEAD") or "unknown"
    dirty = " + uncommitted changes" if git("status", "--porcelain", "--untracked-files=no") else ""
    command = " ".join([Path(sys.executable).name, *[a if " " not in a else repr(a) for a in sys.argv]])
    return f"Commit {commit}{dirty}; `{command}`; {datetime.now():%Y-%m-%d %H:%M}."


def table(header: list[str], rows: list[list]) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(out)


def mean_spread(values: list[float], fmt: str = ".3f") -> str:
    """'0.912 ± 0.008' (mean ± sample standard deviation) over repeats; one value alone as it is."""
    if len(values) == 1:
        return format(values[0], fmt)
    return f"{format(statistics.mean(values), fmt)} ± {format(statistics.stdev(values), fmt)}"
