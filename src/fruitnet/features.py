"""Pooled features of a network body, one row per photo: the one extractor that training, the
unknown verdict, `check --deep` and `teach` use.

Batches come from one of two sources:
- `from_dataset`: a torch Dataset of (normalised tensor, class index) pairs, such as training's
  decoded images and their augmented views; under torchrun each rank extracts its shard and
  every rank gets the whole set back, in order;
- `from_files`: photos on disk, decoded by threads ahead of the body (transforms.input_batches,
  as predict does).  A `FeatureCache` keeps each photo's row on disk by content (sha256), so a
  photo goes through the body once however often it is checked, ranked or refitted.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

from fruitnet import distributed
from fruitnet.arithmetic import Arithmetic, choose_arithmetic
from fruitnet.progress import bar as progress_bar
from fruitnet.transforms import input_batches


@torch.no_grad()
def extract(body: nn.Module, batches, device, arith: Arithmetic | None = None, total: int | None = None,
            desc: str = "features", progress: bool = True, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """body(x) for every input batch, on the CPU as `dtype`, rows in order."""
    arith = arith or choose_arithmetic("fp32", device)
    body.eval()
    rows = []
    for x in progress_bar(batches, total=total, desc=desc, unit="batch", disable=not progress):
        with arith.autocast(device):
            rows.append(body(arith.prepare_input(x.to(device, torch.float32))).to(dtype).cpu())
    return torch.cat(rows) if rows else torch.empty(0)


def from_dataset(body: nn.Module, dataset: Dataset, batch_size: int, device, arith: Arithmetic | None = None,
                 workers: int = 0, desc: str = "features", shared: bool = True,
                 dtype: torch.dtype = torch.float32) -> TensorDataset:
    """(features, targets) of a dataset of (tensor, class index), in its order.  shared=False: this
    process alone does all of it (under torchrun, rank 0's own work, such as the trust statistics).
    `body` may be any module: a frozen stem gives mid-network feature maps (kept as bf16)."""
    sampler = distributed.sampler(dataset, False, 0) if shared else None
    loader = DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=workers)
    targets = []

    def inputs():
        for x, y in loader:
            targets.append(torch.as_tensor(y))
            yield x

    rows = extract(body, inputs(), device, arith, len(loader), desc, distributed.is_main(), dtype)
    ys = torch.cat(targets) if targets else torch.empty(0, dtype=torch.long)
    return TensorDataset(*(distributed.gather_shards(rows, ys) if shared else (rows, ys)))


def body_fingerprint(body: nn.Module) -> str:
    """A short hash of the body's weights: cached features are only reused for the same body
    (every frozen model of a backbone shares its pretrained body, and so its cache)."""
    h = hashlib.sha256()
    for name, tensor in body.state_dict().items():
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


class FeatureCache:
    """One .npy row per photo content and body: FOLDER/<fingerprint>/<sha256>.npy."""

    def __init__(self, folder: str | Path, fingerprint: str):
        self.folder = Path(folder) / fingerprint

    def get(self, sha256: str) -> np.ndarray | None:
        path = self.folder / f"{sha256}.npy"
        try:
            return np.load(path, allow_pickle=False) if path.is_file() else None
        except (OSError, ValueError):  # a damaged entry is computed again
            return None

    def put(self, sha256: str, row: np.ndarray) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        tmp = self.folder / f"{sha256}.tmp.npy"
        np.save(tmp, row)
        tmp.replace(self.folder / f"{sha256}.npy")


def from_files(body: nn.Module, files: list[tuple[str, str]], pre: dict, device, arith: Arithmetic | None = None,
               batch_size: int = 32, cache: FeatureCache | None = None, desc: str = "features",
               progress: bool = True) -> tuple[np.ndarray, dict[str, str]]:
    """Features of photos given as (path, sha256) pairs: a (n, d) float32 array in their order,
    and {path: reason} for the files that could not be decoded (their rows are NaN).

    Photos with the same content are run once; with a cache, photos seen before are not run at all."""
    known: dict[str, np.ndarray] = {}
    if cache is not None:
        known = {sha: row for sha in {s for _, s in files} if (row := cache.get(sha)) is not None}
    todo = list({sha: path for path, sha in files if sha not in known}.items())
    failed: dict[str, str] = {}
    if todo:
        paths = [path for _, path in todo]
        chunks = input_batches(paths, pre, batch_size)
        good = []

        def inputs():
            for start, (prepared, x) in zip(range(0, len(paths), batch_size), chunks):
                for k, d in enumerate(prepared):
                    if isinstance(d, str):
                        failed[paths[start + k]] = d
                    else:
                        good.append(todo[start + k][0])
                if x is not None:
                    yield x

        rows = extract(body, inputs(), device, arith, -(-len(paths) // batch_size), desc, progress).numpy()
        for sha, row in zip(good, rows):
            known[sha] = row
            if cache is not None:
                cache.put(sha, row)
    width = next(iter(known.values())).shape[0] if known else 0
    blank = np.full(width, np.nan, dtype=np.float32)
    return np.stack([known.get(sha, blank) for _, sha in files]).astype(np.float32) if files else \
        np.zeros((0, width), np.float32), failed
