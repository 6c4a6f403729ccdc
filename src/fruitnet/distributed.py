"""Data-parallel training on several processes, GPUs or machines, launched by torchrun.

torchrun starts one process per device and tells each who it is through environment variables
(WORLD_SIZE, RANK, LOCAL_RANK, MASTER_ADDR, MASTER_PORT).  A plain `fruitnet train` has none of
them and runs as a world of one: every helper here is then a no-op, so training.py reads the
same either way.

The rules the training loop follows:
- rank 0 alone touches the run folder (reads it on --resume, creates and writes it otherwise),
  scans the data and prints; the other ranks receive what they need by broadcast (`on_main`),
  so they never create folders and a run folder need only exist on rank 0's machine;
- `--batch-size` is the global batch; each rank takes batch_size / world_size (it must divide);
- the training set is sharded by a DistributedSampler (padded by repeating a few items so every
  rank takes the same number of steps; `set_epoch` reshuffles each epoch);
- evaluation and feature extraction shard *without* padding (rank r takes items r, r+W, r+2W,
  ...) and the results are summed (`sum_across`) or gathered back into the original order
  (`gather_shards`), so every validation image counts exactly once;
- BatchNorm running statistics are broadcast from rank 0 before validation (`sync_buffers`), so
  every rank validates exactly the model that rank 0 saves.
"""

from __future__ import annotations

import os
import pickle
import signal
from dataclasses import dataclass, field
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import Dataset, DistributedSampler, RandomSampler, Sampler, SequentialSampler

from fruitnet.arithmetic import resolve_device
from fruitnet.errors import DataError, UsageError

# Rank 0 scans the data (decoding every image once) while the others wait in a broadcast, which
# can take a while on a large folder: wait longer than torch's default before giving up.
TIMEOUT = timedelta(hours=2)


@dataclass(frozen=True)
class World:
    rank: int = 0
    local_rank: int = 0
    size: int = 1
    local_size: int = 1
    backend: str | None = None
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1

    def per_rank_batch(self, batch_size: int) -> int:
        """The global --batch-size divided among the ranks; it must divide evenly."""
        if batch_size % self.size == 0:
            return batch_size // self.size
        lower, upper = batch_size - batch_size % self.size, batch_size - batch_size % self.size + self.size
        hint = f"{lower} or {upper}" if lower else f"{upper}"
        exc = DataError(f"--batch-size {batch_size} is the global batch and must divide evenly among "
                        f"{self.size} processes (each takes batch-size / {self.size}); try {hint}")
        exc.reported_by_main = not self.is_main  # every rank finds this; rank 0 says it
        raise exc

    def describe(self, batch_size: int) -> dict | None:
        """What config.json records about the process group (None for a plain run)."""
        if not self.distributed:
            return None
        return {"world_size": self.size, "local_world_size": self.local_size,
                "nodes": max(1, self.size // max(self.local_size, 1)), "backend": self.backend,
                "global_batch_size": batch_size, "per_rank_batch_size": self.per_rank_batch(batch_size),
                "batch_division": "global --batch-size / world_size (must divide evenly)"}


_WORLD: World | None = None
_PREVIOUS_SIGTERM = None


def launched() -> bool:
    """True in a process started by torchrun (or any launcher setting WORLD_SIZE > 1 and RANK)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and "RANK" in os.environ


def _interrupted(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


def init(device: str = "auto") -> World:
    """Join the process group when launched by torchrun (idempotent); otherwise a world of one.

    CUDA (device auto or cuda, GPUs present): backend nccl, rank uses cuda:LOCAL_RANK.
    Otherwise: backend gloo on CPU.
    """
    global _WORLD, _PREVIOUS_SIGTERM
    if _WORLD is not None:
        return _WORLD
    if not launched():
        return World(device=resolve_device(device))
    rank, size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    local_size = int(os.environ.get("LOCAL_WORLD_SIZE", str(size)))
    use_cuda = device == "auto" and torch.cuda.is_available() or device.startswith("cuda")
    if use_cuda:
        if not torch.cuda.is_available():
            raise UsageError(f"--device {device}: no CUDA device here; use --device cpu")
        if local_rank >= torch.cuda.device_count():
            raise UsageError(f"local rank {local_rank} needs GPU {local_rank}, but this machine has "
                            f"{torch.cuda.device_count()}: use --nproc_per_node at most the number of GPUs")
        dev, backend = torch.device("cuda", local_rank), "nccl"
        torch.cuda.set_device(dev)
    else:
        dev, backend = torch.device("cpu"), "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend, rank=rank, world_size=size, timeout=TIMEOUT,
                                **({"device_id": dev} if use_cuda else {}))
    try:  # torchrun stops the workers with SIGTERM (Ctrl-C, or another rank failed): exit like Ctrl-C
        _PREVIOUS_SIGTERM = signal.signal(signal.SIGTERM, _interrupted)
    except ValueError:  # not the main thread
        _PREVIOUS_SIGTERM = None
    _WORLD = World(rank, local_rank, size, local_size, backend, dev)
    return _WORLD


def teardown() -> None:
    """Leave the process group (if any) and forget the world; safe to call more than once."""
    global _WORLD, _PREVIOUS_SIGTERM
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    if _PREVIOUS_SIGTERM is not None:
        signal.signal(signal.SIGTERM, _PREVIOUS_SIGTERM)
        _PREVIOUS_SIGTERM = None
    _WORLD = None


def world() -> World:
    """The current world; before init, a world of one whose rank comes from the environment."""
    if _WORLD is not None:
        return _WORLD
    return World(rank=int(os.environ.get("RANK", "0")) if launched() else 0)


def is_main() -> bool:
    return world().is_main


def quiet(*args, **kwargs) -> None:
    """The log function of ranks other than 0."""


def barrier() -> None:
    if world().distributed:
        dist.barrier()


def _picklable(exc: Exception) -> Exception:
    try:
        pickle.loads(pickle.dumps(exc))
        return exc
    except Exception:
        return RuntimeError(f"{type(exc).__name__}: {exc}")


def on_main(fn, *args, **kwargs):
    """Run fn on rank 0 only and return its result on every rank; if it raises, every rank raises.

    On the other ranks the exception is marked `reported_by_main` (rank 0 prints it; they exit
    with the same code, quietly).
    """
    w = world()
    if not w.distributed:
        return fn(*args, **kwargs)
    box = [None]
    if w.is_main:
        try:
            box[0] = (True, fn(*args, **kwargs))
        except Exception as exc:
            box[0] = (False, _picklable(exc))
            dist.broadcast_object_list(box, src=0)
            raise
    dist.broadcast_object_list(box, src=0)
    ok, value = box[0]
    if not ok:
        value.reported_by_main = True
        raise value
    return value


class ShardSampler(Sampler[int]):
    """Items rank, rank + size, rank + 2 size, ...: every item on exactly one rank, no padding."""

    def __init__(self, n: int, size: int, rank: int):
        self.indices = range(rank, n, size)

    def __iter__(self):
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


def sampler(dataset: Dataset, shuffle: bool, seed: int, generator: torch.Generator | None = None) -> Sampler:
    """Training (shuffle=True): a seeded DistributedSampler; evaluation: an unpadded shard.

    A world of one gets exactly what DataLoader(shuffle=..., generator=...) would build.
    """
    w = world()
    if not w.distributed:
        return RandomSampler(dataset, generator=generator) if shuffle else SequentialSampler(dataset)
    if shuffle:
        return DistributedSampler(dataset, num_replicas=w.size, rank=w.rank, shuffle=True, seed=seed,
                                  drop_last=False)
    return ShardSampler(len(dataset), w.size, w.rank)


def set_epoch(loader, epoch: int) -> None:
    """Reshuffle a DistributedSampler for this epoch (same order on every rank, new each epoch)."""
    if isinstance(getattr(loader, "sampler", None), DistributedSampler):
        loader.sampler.set_epoch(epoch)


def wrap(net: nn.Module) -> nn.Module:
    """DistributedDataParallel around net (it averages gradients across ranks); net itself alone."""
    w = world()
    if not w.distributed or not any(p.requires_grad for p in net.parameters()):
        return net
    return nn.parallel.DistributedDataParallel(net, device_ids=[w.device.index] if w.device.type == "cuda" else None)


@torch.no_grad()
def sync_buffers(module: nn.Module) -> None:
    """Give every rank rank 0's buffers (BatchNorm running statistics drift apart in training)."""
    if world().distributed:
        for buffer in module.buffers():
            dist.broadcast(buffer, src=0)


def sum_across(*values: float) -> tuple:
    """Element-wise sums over the ranks (float64: integer counts stay exact); unchanged alone."""
    w = world()
    if not w.distributed:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=w.device)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return tuple(t.tolist())


def unshard(parts: list[torch.Tensor]) -> torch.Tensor:
    """Rows computed over ShardSampler shards (part r holds items r, r + W, r + 2W, ...) back in
    the dataset's order."""
    size, n = len(parts), sum(len(p) for p in parts)
    order = torch.cat([torch.arange(r, n, size) for r in range(size)])
    data = torch.cat([p for p in parts if len(p)])
    full = torch.empty_like(data)
    full[order] = data
    return full


def gather_shards(*tensors: torch.Tensor) -> tuple:
    """Rows computed over ShardSampler shards -> the full tensors, in the dataset's order, on every rank."""
    w = world()
    if not w.distributed:
        return tensors
    parts: list = [None] * w.size
    dist.all_gather_object(parts, [t.cpu() for t in tensors])
    return tuple(unshard([p[i] for p in parts]) for i in range(len(tensors)))
