"""From lists of photos to batches: the Photos dataset, loaders, cached features.

Where the time goes, and what saves it:
- `Photos(cache=True)` decodes, orients and resizes every image once per run and keeps it as
  uint8; epochs then only crop, flip and normalise tensors.  `cache=False` decodes on every
  access (for folders too large for memory).  Both run the same transforms.TensorTransform, so
  a recipe trains the same way whether the cache is on or off;
- with a frozen body the features are computed once (a few augmented views when the recipe
  augments), and the head trains on them: epochs take milliseconds;
- partial fine-tuning (mode partial) splits the body (backbones.split_body): the frozen stem
  runs once over the same views and its mid-network feature maps are kept as bf16, within
  MAX_STEM_CACHE_BYTES (fewer views where they would not fit); the epochs run only the tail.
"""

from __future__ import annotations

import copy
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

from fruitnet import distributed
from fruitnet.arithmetic import Arithmetic
from fruitnet.backbones import split_body
from fruitnet.balance import sample_weights
from fruitnet.config import Recipe, TrainConfig
from fruitnet.dataset import Item
from fruitnet.errors import ImageError, UsageError
from fruitnet.features import from_dataset
from fruitnet.outputs import printable
from fruitnet.progress import bar as progress_bar
from fruitnet.transforms import Decode, TensorTransform, resize_size

MAX_CACHE_BYTES = 4 << 30  # above this, decode per access instead (a huge folder must not fill memory)
MAX_STEM_CACHE_BYTES = 3 << 30  # partial: the frozen stem's bf16 feature maps, every view and validation
FEATURE_BATCH = 256  # batch for the head on cached features (tiny tensors: bigger batches are free)


def estimated_bytes(n_images: int, pre: dict) -> int:
    side = resize_size(pre)
    return int(n_images * side * side * 3 * 1.4)  # non-square photos are up to ~1.4x larger on average


class Photos(Dataset):
    """(normalised tensor, class index) per item, through Decode then `transform`.

    cache=True decodes every image now (in threads: PIL works without the GIL) and keeps the
    uint8 tensors; a file that cannot be decoded any more (deleted or changed since the scan) is
    left out and listed in `dropped`.  cache=False decodes on every access.
    """

    def __init__(self, items: list[Item], classes: list[str], pre: dict, transform: TensorTransform,
                 cache: bool = True, progress: bool = True, desc: str = "decoding", threads: int = 4):
        index = {c: i for i, c in enumerate(classes)}
        self.decode, self.transform = Decode(pre), transform
        self.dropped: list[dict] = []
        self.images = None
        if cache:
            with ThreadPoolExecutor(threads) as pool:
                decoded = list(progress_bar(pool.map(self._try_decode, items), total=len(items), desc=desc,
                                             unit="img", disable=not progress))
            kept = [(it, img) for it, img in zip(items, decoded) if isinstance(img, torch.Tensor)]
            self.dropped = [{"path": it.path, "reason": img} for it, img in zip(items, decoded)
                            if not isinstance(img, torch.Tensor)]
            items, self.images = [it for it, _ in kept], [img for _, img in kept]
        self.paths = [it.path for it in items]
        self.targets = [index[it.label] for it in items]

    def _try_decode(self, item: Item) -> torch.Tensor | str:
        try:
            return self.decode.load(item.path)
        except ImageError as exc:
            return exc.reason

    def with_transform(self, transform: TensorTransform) -> "Photos":
        """The same (decoded) images under another transform: nothing is decoded again."""
        other = copy.copy(self)
        other.transform = transform
        return other

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, i):
        img = self.images[i] if self.images is not None else self.decode.load(self.paths[i])
        return self.transform(img), self.targets[i]


def make_loader(dataset: Dataset, batch_size: int, shuffle: bool, workers: int = 0,
                generator: torch.Generator | None = None, seed: int = 0, drop_last: bool = False,
                weights: list[float] | None = None) -> DataLoader:
    """Under torchrun each rank reads its own shard (distributed.sampler); with per-photo weights
    (--balance sampler) photos are drawn with replacement in proportion to them.

    Workers are not persistent: each epoch's workers get the dataset as it is then (the
    training resolution changes between epochs)."""
    generator = generator or torch.Generator().manual_seed(seed)
    drop_last = drop_last and len(dataset) > batch_size * distributed.world().size
    sampler = (torch.utils.data.WeightedRandomSampler(weights, len(dataset), generator=generator) if weights
               else distributed.sampler(dataset, shuffle, seed, generator))
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=workers, generator=generator,
                      drop_last=drop_last)


@dataclass
class Pipeline:
    """Everything an epoch reads.  With `feature_views` (frozen body, cached features) the head
    trains on view (epoch - 1) % n; otherwise on `train` photos at the epoch's resolution."""

    train: Photos  # augmented as the recipe says
    plain_train: Photos  # the same photos, evaluation transform (features, head warm-up)
    val: Photos
    recipe: Recipe
    epochs: int
    batch_size: int  # per process
    seed: int
    workers: int  # decoding processes; 0 with the image cache
    generator: torch.Generator  # one for the run: a new shuffle each epoch, restored on --resume
    feature_views: list[TensorDataset] | None = None
    val_features: TensorDataset | None = None
    sample_weights: list[float] | None = None  # --balance sampler: per training photo

    @property
    def image_cache(self) -> bool:
        return self.train.images is not None

    def train_loader(self, epoch: int) -> DataLoader:
        if self.feature_views is not None:
            view = self.feature_views[(epoch - 1) % len(self.feature_views)]
            return make_loader(view, self.batch_size, True, 0, self.generator, self.seed, weights=self.sample_weights)
        low = epoch <= self.recipe.low_res_epochs(self.epochs)
        self.train.transform.size = self.recipe.low_res_size if low else self.train.transform.input_size
        return make_loader(self.train, self.batch_size, True, self.workers, self.generator, self.seed,
                           self.recipe.drop_last, self.sample_weights)

    def val_loader(self) -> DataLoader:
        if self.val_features is not None:
            return make_loader(self.val_features, FEATURE_BATCH, False)
        return make_loader(self.val, self.batch_size, False, self.workers)


def use_image_cache(config: TrainConfig, pre: dict, n_images: int) -> bool:
    """--no-image-cache, or a folder whose decoded images would not fit in MAX_CACHE_BYTES: decode per access."""
    return config.image_cache and estimated_bytes(n_images, pre) <= MAX_CACHE_BYTES


def build_pipeline(config: TrainConfig, recipe: Recipe, pre: dict, classes: list[str], train_items: list[Item],
                   val_items: list[Item], body: nn.Module, device, arith: Arithmetic, batch_size: int,
                   log=print) -> Pipeline:
    """Decode (or plan to decode) the photos; with a frozen body and the feature cache, run the
    body once over them (1 plain + feature_views - 1 augmented views of the training photos)."""
    progress = distributed.is_main()
    cache = use_image_cache(config, pre, len(train_items) + len(val_items))
    train = Photos(train_items, classes, pre, TensorTransform(pre, recipe.augment, recipe.crop_scale), cache,
                   progress, "decoding (train)")
    val = Photos(val_items, classes, pre, TensorTransform(pre), cache, progress, "decoding (val)")
    for d in train.dropped + val.dropped:
        log(printable(f"skipped {d['path']}: {d['reason']} (changed or removed since the scan)"))
    pipeline = Pipeline(train, train.with_transform(TensorTransform(pre)), val, recipe, config.epochs, batch_size,
                        config.seed, 0 if cache else config.workers, torch.Generator().manual_seed(config.seed))
    if config.balance == "sampler":  # every class drawn equally often (balance.py)
        pipeline.sample_weights = sample_weights(train.targets, {c: train.targets.count(i) for i, c in enumerate(classes)})
    if config.mode == "partial":  # bf16 maps where the arithmetic is bf16; fp32 runs stay exact
        frozen, dtype = split_body(body, config.unfreeze_last)[0], torch.bfloat16 if arith.dtype == "bf16" else torch.float32
        n_views = stem_views(frozen, pre, recipe, len(train), len(val), dtype.itemsize, log)
    elif config.mode == "freeze" and config.feature_cache:
        frozen, dtype, n_views = body, torch.float32, recipe.feature_views if recipe.augment != "none" else 1
    else:
        return pipeline
    extract = lambda ds, desc: from_dataset(frozen, ds, batch_size, device, arith, pipeline.workers, desc,  # noqa: E731
                                            dtype=dtype)
    pipeline.feature_views = [extract(pipeline.plain_train, "features (train)")] + [
        extract(train, f"features (train, augmented view {v})") for v in range(1, n_views)]
    pipeline.val_features = extract(val, "features (val)")
    return pipeline


def stem_bytes(frozen_stem: nn.Module, pre: dict, itemsize: int = 2) -> int:
    """Bytes of one photo's cached feature map at the model's input size (2 a value: bf16)."""
    with torch.no_grad():
        return itemsize * frozen_stem.eval()(torch.zeros(1, 3, pre["input_size"], pre["input_size"])).numel()


def stem_views(frozen_stem: nn.Module, pre: dict, recipe: Recipe, n_train: int, n_val: int, itemsize: int = 2,
               log=print) -> int:
    """The recipe's views of the training photos, fewer where they would not fit in
    MAX_STEM_CACHE_BYTES (with the validation photos' maps); said in one line."""
    per_photo = stem_bytes(frozen_stem, pre, itemsize)
    fit = (MAX_STEM_CACHE_BYTES // per_photo - n_val) // max(n_train, 1)
    if fit < 1:
        raise UsageError(f"partial fine-tuning caches {per_photo / 1e3:.0f} kB of feature maps a photo; "
                         f"{n_train + n_val} photos need more than {MAX_STEM_CACHE_BYTES / 2**30:.0f} GiB: "
                         "unfreeze fewer stages (--unfreeze-last) or use --recipe probe")
    n_views = min(recipe.feature_views, fit)
    log(f"mid-network cache: {n_views} view(s) x {n_train} + {n_val} photos x {per_photo / 1e3:.1f} kB "
        f"({'bf16' if itemsize == 2 else 'fp32'}) = "
        f"{(n_views * n_train + n_val) * per_photo / 2**20:.0f} MiB (at most {MAX_STEM_CACHE_BYTES / 2**30:.0f} GiB)")
    return n_views
