"""Data-parallel training under torchrun: 2 CPU processes with gloo on loopback.

Each torchrun launch takes ~20 s on 2 cores (EfficientNet-Lite0, 30 small synthetic images).
"""

from __future__ import annotations

import csv
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from PIL import Image, ImageDraw
from torch.utils.data import DataLoader, RandomSampler, SequentialSampler, TensorDataset

from fruitnet import distributed
from fruitnet.images import load_image
from fruitnet.model import load_model
from fruitnet.transforms import eval_transform

# 21 train / 9 validation images: both odd, so a padded shard would count an image twice
# fp32: the exact comparisons below need the same arithmetic as the single-process reference
COMMON = ["--backbone", "efficientnet_lite0", "--batch-size", "4", "--workers", "0", "--val-fraction", "0.3",
          "--precision", "fp32"]
RUN_FILES = {"best.safetensors", "last.safetensors", "checkpoint.pt", "metrics.csv", "curves.png", "split.csv",
             "data_report.txt", "data_report.json", "config.json", "summary.json"}


def make_shapes(root: Path, per_class: int = 10, seed: int = 0) -> Path:
    """3 classes of distinct 64x64 coloured shapes (circle red, square green, triangle blue)."""
    rng = random.Random(seed)
    colours = {"circle": (220, 40, 40), "square": (40, 180, 40), "triangle": (40, 60, 220)}
    for cls, colour in colours.items():
        (root / cls).mkdir(parents=True)
        for i in range(per_class):
            im = Image.new("RGB", (64, 64), tuple(rng.randrange(200, 256) for _ in range(3)))
            draw = ImageDraw.Draw(im)
            s, x, y = rng.randrange(20, 40), rng.randrange(0, 24), rng.randrange(0, 24)
            fill = tuple(max(0, min(255, v + rng.randrange(-30, 30))) for v in colour)
            if cls == "circle":
                draw.ellipse([x, y, x + s, y + s], fill=fill)
            elif cls == "square":
                draw.rectangle([x, y, x + s, y + s], fill=fill)
            else:
                draw.polygon([(x, y + s), (x + s, y + s), (x + s // 2, y)], fill=fill)
            im.save(root / cls / f"{i:02d}.png")
    return root


@pytest.fixture(scope="module")
def shapes(tmp_path_factory) -> Path:
    return make_shapes(tmp_path_factory.mktemp("shapes") / "data")


def torchrun_cmd(*args, nproc: int = 2) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
            "-m", "fruitnet", "train", *map(str, args)]


def torchrun(*args, cwd=None, timeout=300) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(torchrun_cmd(*args), capture_output=True, text=True, timeout=timeout, cwd=cwd, env=env)


def metrics(run: Path) -> list[dict]:
    with open(run / "metrics.csv", newline="") as f:
        return list(csv.DictReader(f))


def independent_evaluation(model: Path, run: Path) -> tuple[float, float, int]:
    """(accuracy, mean cross-entropy, n) of a model file on the run's validation list, one process."""
    with open(run / "split.csv", newline="") as f:
        val = [row for row in csv.DictReader(f) if row["split"] == "val"]
    net, meta = load_model(model)  # the raw network: validation in training is before calibration
    transform = eval_transform(meta["preprocessing"])
    with torch.no_grad():
        logits = net(torch.stack([transform(load_image(row["path"])) for row in val]))
    targets = torch.tensor([meta["classes"].index(row["class"]) for row in val])
    correct = int((logits.argmax(1) == targets).sum())
    loss = float(torch.nn.functional.cross_entropy(logits.double(), targets))
    return correct / len(val), loss, len(val)


def assert_complete_run(run: Path, epochs: list[int]) -> list[dict]:
    assert RUN_FILES <= {p.name for p in run.iterdir()}, sorted(p.name for p in run.iterdir())
    assert not list(run.glob("*.tmp"))
    rows = metrics(run)
    assert [int(r["epoch"]) for r in rows] == epochs  # one row per epoch, no duplicates
    config = json.loads((run / "config.json").read_text())
    assert config["distributed"]["world_size"] == 2 and config["distributed"]["backend"] == "gloo"
    assert config["distributed"]["per_rank_batch_size"] * 2 == config["train"]["batch_size"] == 4
    summary = json.loads((run / "summary.json").read_text())
    assert summary["epochs"] == len(epochs)
    assert summary["best_val_accuracy"] == max(float(r["val_accuracy"]) for r in rows)
    return rows


def assert_validation_matches_one_process(run: Path, rows: list[dict]) -> None:
    """metrics.csv's last val accuracy is exactly the single-process accuracy of last.safetensors."""
    accuracy, loss, n = independent_evaluation(run / "last.safetensors", run)
    assert n == 9
    assert float(rows[-1]["val_accuracy"]) == accuracy  # the same fraction of the same 9 images
    # the loss catches ranks validating different models (e.g. BatchNorm statistics not synchronised)
    assert float(rows[-1]["val_loss"]) == pytest.approx(loss, rel=1e-4)


# --- a world of one: the helpers change nothing -------------------------------------------------

def test_a_plain_process_is_a_world_of_one(monkeypatch):
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    world = distributed.init("cpu")
    assert (world.size, world.rank, world.is_main, world.distributed) == (1, 0, True, False)
    assert not torch.distributed.is_initialized()
    assert world.per_rank_batch(7) == 7 and world.describe(7) is None
    data = TensorDataset(torch.arange(10.0)[:, None], torch.arange(10))
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    ours = DataLoader(data, batch_size=4, sampler=distributed.sampler(data, True, 3, g1), generator=g1)
    plain = DataLoader(data, batch_size=4, shuffle=True, generator=g2)
    assert [y.tolist() for _, y in ours] == [y.tolist() for _, y in plain]
    assert isinstance(distributed.sampler(data, True, 3, g1), RandomSampler)
    assert isinstance(distributed.sampler(data, False, 3), SequentialSampler)
    x = torch.randn(5, 3)
    assert distributed.gather_shards(x)[0] is x and distributed.sum_across(1.5, 2, 3) == (1.5, 2, 3)
    distributed.barrier()
    distributed.teardown()


def test_global_batch_must_divide_among_ranks():
    assert distributed.World(size=4).per_rank_batch(32) == 8
    with pytest.raises(distributed.DataError, match="--batch-size 30 .* 4 processes.*try 28 or 32"):
        distributed.World(size=4).per_rank_batch(30)
    with pytest.raises(distributed.DataError, match="try 4$"):
        distributed.World(size=4).per_rank_batch(2)


@pytest.mark.parametrize("n,size", [(9, 2), (10, 2), (3, 4), (21, 3)])
def test_evaluation_shards_cover_every_item_exactly_once(n, size):
    shards = [list(distributed.ShardSampler(n, size, rank)) for rank in range(size)]
    assert sorted(i for s in shards for i in s) == list(range(n))
    # each rank computes rows for its shard (here: item index, squared); gather_shards' unshard
    # puts them back in dataset order, empty shards included
    rows = [torch.tensor([[i, i * i] for i in s], dtype=torch.long).reshape(-1, 2) for s in shards]
    assert distributed.unshard(rows).tolist() == [[i, i * i] for i in range(n)]


def test_scan_keeps_a_bounded_number_of_files_in_flight():
    """Rank 0 scans alone; a huge folder must not queue one job (and its result) per file at once."""
    from concurrent.futures import ThreadPoolExecutor

    from fruitnet.dataset import _ordered_map

    pulled, yielded, most = 0, 0, 0

    def args():
        nonlocal pulled
        for i in range(500):
            pulled += 1
            yield i

    with ThreadPoolExecutor(4) as pool:
        out = []
        for r in _ordered_map(pool, lambda i: i * i, args(), window=8):
            yielded += 1
            most = max(most, pulled - yielded)
            out.append(r)
    assert out == [i * i for i in range(500)] and most < 8


# --- two processes with torchrun ----------------------------------------------------------------

def test_two_processes_train_resume_and_validate_like_one(shapes, tmp_path):
    """Unfreeze mode (the original recipe), 1 epoch, then --resume to 2 (after a simulated kill
    mid-save); checks the run folder."""
    run = tmp_path / "run"
    first = torchrun(shapes, "--out", run, "--recipe", "original", "--epochs", "1", *COMMON)
    assert first.returncode == 0, first.stderr[-3000:]
    assert first.stdout.count("split: 21 train, 9 validation") == 1  # only rank 0 prints
    assert "global batch 4 = 2 x 2" in first.stdout
    assert [int(r["epoch"]) for r in metrics(run)] == [1]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]
    epoch1 = metrics(run)[0]

    # What a process killed between the metrics row and the checkpoint rename leaves behind:
    (run / "checkpoint.pt.tmp").write_bytes(b"half a checkpoint")
    with open(run / "metrics.csv", "a") as f:
        f.write("2,1.0,0.5,0.5,0.5,0.5,0.001\n")

    second = torchrun("--resume", run, "--epochs", "2", cwd=tmp_path)
    assert second.returncode == 0, second.stderr[-3000:]
    assert second.stdout.count(f"resuming {run} at epoch 2") == 1
    rows = assert_complete_run(run, [1, 2])
    assert rows[0] == epoch1
    assert_validation_matches_one_process(run, rows)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]  # nobody made another folder
    assert torch.load(run / "checkpoint.pt", weights_only=True)["epoch"] == 2


def test_two_processes_freeze_with_feature_cache_and_default_run_folder(shapes, tmp_path):
    """Freeze mode: each rank extracts its shard of features; no --out: one timestamped folder."""
    work = tmp_path / "work"
    work.mkdir()
    result = torchrun(shapes, "--mode", "freeze", *COMMON, cwd=work)  # the probe recipe: one L-BFGS fit
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("feature pass") == 1
    runs = list((work / "runs").iterdir())
    assert len(runs) == 1 and sorted(p.name for p in work.iterdir()) == ["runs"]
    rows = assert_complete_run(runs[0], [1])
    assert_validation_matches_one_process(runs[0], rows)
    best = json.loads((runs[0] / "summary.json").read_text())["best_epoch"]
    accuracy, _, _ = independent_evaluation(runs[0] / "best.safetensors", runs[0])
    assert accuracy == float(rows[best - 1]["val_accuracy"])


def test_a_global_batch_that_does_not_divide_stops_every_rank_with_one_message(shapes, tmp_path):
    result = torchrun(shapes, "--out", tmp_path / "run", "--batch-size", "5", "--epochs", "1",
                      "--backbone", "efficientnet_lite0", "--workers", "0")
    assert result.returncode != 0
    assert result.stderr.count("--batch-size 5 is the global batch and must divide evenly among 2") == 1
    assert "exitcode  : 2" in result.stderr
    assert not (tmp_path / "run").exists()


def _worker_pids(launcher_pid: int) -> dict[int, int]:
    """{rank: pid} of torchrun's worker processes, read from /proc."""
    pids = set()
    for children in Path(f"/proc/{launcher_pid}/task").glob("*/children"):
        pids |= {int(p) for p in children.read_text().split()}
    ranks = {}
    for pid in pids:
        try:
            env = dict(line.split("=", 1) for line in Path(f"/proc/{pid}/environ").read_text().split("\0") if "=" in line)
        except OSError:
            continue
        if "RANK" in env:
            ranks[int(env["RANK"])] = pid
    return ranks


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="finds the worker processes through /proc")
def test_ctrl_c_on_one_rank_leaves_a_resumable_run(shapes, tmp_path):
    run = tmp_path / "run"
    proc = subprocess.Popen(torchrun_cmd(shapes, "--out", run, "--recipe", "original", "--mode", "freeze", "--epochs",
                                         "50", *COMMON), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        deadline = time.monotonic() + 180
        while not (run / "checkpoint.pt").exists() and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.2)
        assert (run / "checkpoint.pt").exists(), "no epoch finished"
        time.sleep(0.5)  # somewhere in the next epoch
        os.kill(_worker_pids(proc.pid)[1], signal.SIGINT)  # Ctrl-C on rank 1 only
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode != 0
    assert out.count("the last finished epoch is saved; continue with: fruitnet train --resume") == 1, out[-2000:]
    saved = torch.load(run / "checkpoint.pt", weights_only=True)["epoch"]
    assert saved >= 1
    resumed = torchrun("--resume", run, "--epochs", str(saved + 1))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert [int(r["epoch"]) for r in metrics(run)] == list(range(1, saved + 2))


def test_two_processes_fine_tune_in_part_resume_and_validate_like_one(shapes, tmp_path):
    """Partial fine-tuning (Lite0's last stage) under torchrun: each rank extracts its shard of the
    mid-network maps and holds them all, the tail trains data-parallel, 1 epoch then --resume to 2."""
    run = tmp_path / "run"
    first = torchrun(shapes, "--out", run, "--mode", "partial", "--unfreeze-last", "1", "--epochs", "1", *COMMON)
    assert first.returncode == 0, first.stderr[-3000:]
    assert first.stdout.count("mid-network cache: 4 view(s) x 21 + 9 photos") == 1  # said once, by rank 0
    assert first.stdout.count("head warm-up: the probe's fit") == 1
    second = torchrun("--resume", run, "--epochs", "2", cwd=tmp_path)
    assert second.returncode == 0, second.stderr[-3000:]
    rows = assert_complete_run(run, [1, 2])
    assert_validation_matches_one_process(run, rows)
    assert json.loads((run / "config.json").read_text())["train"]["unfreeze_last"] == 1
