"""Progress that suits where it goes: whole lines for a log file or a pipe, bars on a terminal."""

import io
import time

from fruitnet.progress import Lines, bar


def test_lines_come_every_interval_and_once_more_at_the_end():
    log = io.StringIO()
    for _ in Lines(range(30), desc="epoch 1/8", unit="batch", file=log, every=0.05):
        time.sleep(0.01)
    lines = log.getvalue().splitlines()
    assert "\r" not in log.getvalue() and 3 <= len(lines) <= 10
    assert all(line.startswith("epoch 1/8: ") and "batch/s" in line for line in lines)
    assert lines[-1].startswith("epoch 1/8: 100% 30/30 [")  # the log shows that it finished


def test_a_task_shorter_than_the_interval_leaves_the_log_alone():
    log = io.StringIO()
    with Lines(total=64, desc="predicting", unit="img", file=log, every=60) as progress:
        for _ in range(8):
            progress.update(8)
    assert log.getvalue() == ""


def test_a_disabled_bar_passes_the_iterable_through(capsys):
    assert list(bar(range(5), desc="x", disable=True)) == [0, 1, 2, 3, 4]
    with bar(total=3, desc="x", disable=True) as b:
        b.update(3)
    assert capsys.readouterr().err == ""
