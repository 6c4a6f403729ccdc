"""The training benchmark's --quick mode (bundled photos only): the script runs and stamps its table."""

import subprocess
import sys

from conftest import REPO


def test_quick_training_benchmark_prints_a_stamped_table(tmp_path):
    out = tmp_path / "train-quick.md"
    result = subprocess.run([sys.executable, str(REPO / "bench" / "bench_train.py"), "--quick", "--parts", "2", "4",
                             "--out", str(out)], capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    text = out.read_text()
    assert "Machine: " in text and "Commit " in text and "--quick" in text
    rows = [line for line in text.splitlines() if line.startswith("| seed |") or line.startswith("| fast |")]
    assert len(rows) == 2  # part 2: one row per recipe, with accuracies
    assert all(0.0 <= float(row.split("|")[3]) <= 1.0 for row in rows)
    assert "img/s" in text  # part 4: prediction throughput
