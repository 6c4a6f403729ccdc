"""Teaching a model where it fails: rank the photos of a new folder by how much a label would
help, take a few labels, refit the head and the unknown verdict in seconds, and write a new
model file that records where it came from.

Why it is fast: the body stays as it is (the pretrained one for the default frozen models), so
every photo goes through it once (features.from_files, cached by content) and a refit is a
logistic regression on a few hundred feature rows (training.fit_linear_head).  A fine-tuned
model (`--mode unfreeze`, whose verdict is the energy of its logits, not kNN) is refused with the
command that teaches it instead: `fruitnet train photos/ labelled/ --mode unfreeze`.

What a refit does, given the model's own training and validation photos (its run folder's
split.csv) and the labelled photos:
- the head is fitted on the training photos plus every labelled photo of a class;
- the kNN bank (unknown.py) holds the training photos plus every labelled photo of a class (these
  always, the training photos sampled down to unknown.MAX_BANK in all);
- the threshold: the in-distribution share is measured against the validation photos and the
  labelled photos, each labelled photo scored against the bank without itself (leave one out),
  so a photo counts as known only as far as the others make it typical; photos labelled "none
  of these" never enter the bank or the head: they are negatives the threshold is raised
  against, by at most unknown.NEGATIVE_SLACK of the validation photos (unknown.fit_threshold);
- the temperature is fitted again on the validation photos.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import shutil
import threading
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import numpy as np
import torch

from fruitnet.config import TEACH_STRATEGIES as STRATEGIES
from fruitnet.errors import UsageError
from fruitnet.outputs import printable
from fruitnet.predictors import UNKNOWN

NONE_LABEL = "none"  # what --labels and the page call "none of these"
LABELS_CSV = "labels.csv"


# --- the numbers: features in, a head and a verdict out ----------------------------------------

@dataclass
class Known:
    """Feature rows (float32, the body's pooled features) and their class indices."""

    x: np.ndarray
    y: np.ndarray

    @staticmethod
    def empty(width: int) -> "Known":
        return Known(np.zeros((0, width), np.float32), np.zeros(0, np.int64))

    def __add__(self, other: "Known") -> "Known":
        return Known(np.concatenate([self.x, other.x]), np.concatenate([self.y, other.y]))

    def __len__(self) -> int:
        return len(self.y)


@dataclass
class Refit:
    """A refitted head and unknown verdict, as tensors the model file takes."""

    weight: torch.Tensor
    bias: torch.Tensor
    temperature: float
    bank: torch.Tensor
    val_scores: torch.Tensor
    threshold: float
    seconds: float = 0.0
    numbers: dict = field(default_factory=dict)

    def probabilities(self, x: np.ndarray) -> np.ndarray:
        logits = torch.from_numpy(x).float() @ self.weight.T + self.bias
        return (logits / self.temperature).softmax(1).numpy()

    def in_distribution(self, x: np.ndarray) -> np.ndarray:
        from fruitnet.unknown import UnknownVerdict

        trust = UnknownVerdict(self.val_scores, self.bank)
        return trust.in_distribution(trust.score(None, torch.from_numpy(x).float())).numpy()

    def answers(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(best class, its probability, answered: not "unknown") per row."""
        probs = self.probabilities(x)
        return probs.argmax(1), probs.max(1), self.in_distribution(x) >= self.threshold


def fit_head(known: Known, n_classes: int, l2: float, class_weights: list[float] | None = None) -> tuple:
    """The probe's logistic regression (training.fit_linear_head) on these rows: (weight, bias)."""
    from fruitnet.training import fit_linear_head

    head = torch.nn.Linear(known.x.shape[1], n_classes)
    weight = torch.tensor(class_weights, dtype=torch.float32) if class_weights else None
    fit_linear_head(head, torch.from_numpy(known.x).float(), torch.from_numpy(known.y).long(),
                    torch.nn.CrossEntropyLoss(weight=weight), l2)
    return head.weight.detach().clone(), head.bias.detach().clone()


def refit(train: Known, val: Known, labelled: Known, negatives: np.ndarray, n_classes: int, l2: float,
          recall: float, class_weights: list[float] | None = None) -> Refit:
    """Head, temperature, kNN bank and threshold from the training, validation and labelled photos
    (see the module's docstring)."""
    from fruitnet.calibration import fit_temperature
    from fruitnet.unknown import MAX_BANK, fit_threshold, knn, knn_bank, knn_left_out, normalise

    t0 = time.perf_counter()
    weight, bias = fit_head(train + labelled, n_classes, l2, class_weights)
    keep = max(0, MAX_BANK - len(labelled))
    bank = torch.cat([normalise(torch.from_numpy(labelled.x)), knn_bank(torch.from_numpy(train.x), keep)])
    val_logits = torch.from_numpy(val.x).float() @ weight.T + bias
    temperature = fit_temperature(val_logits, torch.from_numpy(val.y).long())
    own = np.concatenate([np.arange(len(labelled)), np.full(len(bank) - len(labelled), -1)])  # labelled rows first
    known_scores = torch.cat([knn(torch.from_numpy(val.x).float(), bank),
                              knn_left_out(torch.from_numpy(labelled.x).float(), bank, np.arange(len(labelled)), own)])
    negative_scores = knn(torch.from_numpy(negatives).float(), bank) if len(negatives) else torch.zeros(0)
    threshold = fit_threshold(known_scores, negative_scores, recall)
    return Refit(weight, bias, temperature, bank, known_scores.sort().values, threshold,
                 time.perf_counter() - t0)


def cross_validated_accuracy(train: Known, labelled: Known, n_classes: int, l2: float, folds: int = 5,
                             class_weights: list[float] | None = None) -> float | None:
    """Accuracy on the labelled photos of heads that never saw them (k-fold): what to expect on
    more photos like them.  None with fewer than 2 labelled photos."""
    n = len(labelled)
    if n < 2:
        return None
    fold = np.arange(n) % min(folds, n)
    right = 0
    for k in np.unique(fold):
        rest = Known(labelled.x[fold != k], labelled.y[fold != k])
        weight, bias = fit_head(train + rest, n_classes, l2, class_weights)
        logits = torch.from_numpy(labelled.x[fold == k]).float() @ weight.T + bias
        right += int((logits.argmax(1).numpy() == labelled.y[fold == k]).sum())
    return right / n


# --- which photos to show first ---------------------------------------------------------------------

def farthest_first(x: np.ndarray, centres: torch.Tensor | None, count: int) -> tuple[list[int], torch.Tensor]:
    """Greedy k-center: up to `count` rows of x, each the one farthest (cosine) from the centres and
    from the rows picked before it (with no centres, the first pick is the most typical row).
    Returns the picks and every row's similarity to its nearest centre or pick."""
    from fruitnet.unknown import normalise

    v = normalise(torch.from_numpy(x).float())
    if centres is not None and len(centres):
        nearest, picked = (v @ normalise(centres).T).amax(1), []
    else:
        first = int((v @ v.mean(0)).argmax())
        nearest, picked = v @ v[first], [first]
    while len(picked) < min(count, len(v)):
        nearest[picked] = 2.0  # above any similarity: never picked again
        i = int(nearest.argmin())
        picked.append(i)
        nearest = torch.maximum(nearest, v @ v[i])
    return picked, nearest


def rank(strategy: str, x: np.ndarray, fit: Refit, seed: int = 0, ordered: int = 200) -> list[int]:
    """Indices of the pool rows, most useful to label first, by `strategy`:
    coverage: farthest first from everything the model knows (its kNN bank) and from each other;
    diverse: farthest first within the pool alone (greedy k-center);
    uncertainty: "unknown" answers first (least typical first), then the smallest margin between
    the top two classes; random: a seeded shuffle.
    The greedy strategies order the first `ordered` rows; the rest follow, farthest first."""
    n = len(x)
    if strategy == "random":
        return np.random.default_rng(seed).permutation(n).tolist()
    if strategy == "uncertainty":
        probs = np.sort(fit.probabilities(x), 1)
        margin = probs[:, -1] - probs[:, -2]
        in_dist = fit.in_distribution(x)
        unknown = in_dist < fit.threshold
        return sorted(range(n), key=lambda i: (not unknown[i], in_dist[i] if unknown[i] else margin[i]))
    if strategy not in ("coverage", "diverse"):
        raise UsageError(f"unknown ranking {strategy!r}; choose one of: {', '.join(STRATEGIES)}")
    picked, nearest = farthest_first(x, fit.bank if strategy == "coverage" else None, ordered)
    chosen = set(picked)
    return picked + [i for i in nearest.argsort().tolist() if i not in chosen]


# --- a teaching session: the model, its photos, the new folder, the labels --------------------------

@dataclass
class Label:
    source: str  # the photo in the new folder (never changed)
    sha256: str
    label: str  # a class, or NONE_LABEL
    copy: str  # the copy in --into
    time: str


def file_sha256(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def run_photos(model_path: Path, classes: list[str]) -> tuple[list, list, list]:
    """The model's own training and validation photos and its negatives (photos of none of the
    classes), from the split.csv of its run folder; photos gone since are left out."""
    from fruitnet.dataset import read_split

    split = model_path.parent / "split.csv"
    if not split.is_file():
        raise UsageError(f"{model_path}: teach refits on the photos the model was trained on, listed in split.csv "
                         "beside the model file; pass a best.safetensors inside its run folder")
    parts = [[it for it in items if os.path.isfile(it.path)] for items in read_split(split)]
    strange = sorted({it.label for it in parts[0] + parts[1]} - set(classes))
    if strange:
        raise UsageError(f"{split}: classes {strange} are not the model's ({', '.join(classes)})")
    return tuple(parts)


class Teacher:
    """One teaching session: a model file, the photos of new folders, labels copied into `into`,
    refitted models written to `out` (created at the first refit)."""

    def __init__(self, model_path: str | Path, new: list[str], into: str | Path | None = None,
                 out: str | Path | None = None, cache: str | Path | None = None, log=print, progress: bool = True):
        from fruitnet.model import load_model

        self.model_path, self.log, self.progress = Path(model_path), log, progress
        self.model, self.meta = load_model(self.model_path)
        trust = self.meta.get("trust") or {}
        if trust.get("score") != "knn":
            raise UsageError(f"{model_path}: teach refits the head and the kNN unknown verdict of a model with a frozen "
                             "body (the default, --mode freeze); this model's body was fine-tuned, so teach it by "
                             "training again with the labelled photos, in its mode: fruitnet train photos/ labelled/ --mode unfreeze "
                             "(or --mode partial); a model trained with --recipe probe can be taught here")
        self.classes = self.meta["classes"]
        self.into, self.out = Path(into) if into else None, Path(out) if out else None
        self.recall = float(trust.get("recall") or 1 - trust["threshold"])  # files made before the recall was kept
        self.l2 = _run_weight_decay(self.model_path)
        self._start_features(cache)
        self.load(new)
        self.fit = self.shipped = self._shipped_fit()
        self.labels: list[Label] = self._read_labels()
        self.history: list[dict] = []  # the numbers of each refit

    # features, once per photo
    def _start_features(self, cache) -> None:
        from fruitnet.arithmetic import choose_arithmetic
        from fruitnet.features import FeatureCache, body_fingerprint

        self.device = torch.device("cpu")
        self.arith = choose_arithmetic("auto", self.device)
        body = self.arith.prepare_model(self.model.body.eval())
        folder = Path(cache) if cache else _default_cache()
        self.cache = FeatureCache(folder, f"{body_fingerprint(body)}-{self.arith.dtype}")
        self.rows: dict[str, np.ndarray] = {}  # sha256 -> feature row

    def features(self, files: list[tuple[str, str]], desc: str) -> dict[str, str]:
        """Compute (or read from the cache) the rows of (path, sha256) pairs; returns {path: reason}
        for files that cannot be decoded."""
        from fruitnet.features import from_files

        todo = [(p, s) for p, s in files if s not in self.rows]
        rows, failed = from_files(self.model.body, todo, self.meta["preprocessing"], self.device, self.arith,
                                  cache=self.cache, desc=desc, progress=self.progress)
        self.rows.update({s: r for (p, s), r in zip(todo, rows) if p not in failed})
        return failed

    def load(self, new: list[str]) -> None:
        """The model's own photos and the new folders' photos, hashed and run through the body once.
        New photos identical to one the model was trained or validated on are left out."""
        from fruitnet.images import expand_paths

        train, val, negatives = run_photos(self.model_path, self.classes)
        self.train_items, self.val_items, self.run_negatives = train, val, negatives
        for it in train + val + negatives:
            it.sha256 = it.sha256 or file_sha256(it.path)  # split.csv of runs made before it had the column
        failed = self.features([(it.path, it.sha256) for it in train + val + negatives], "features (the model's photos)")
        paths, problems = expand_paths(new)
        if problems:
            raise UsageError("; ".join(f"{p['path']}: {p['error']}" for p in problems))
        known = {it.sha256 for it in train + val}
        pool = {}
        for path in paths:
            sha = file_sha256(path)
            if sha not in known and sha not in pool:
                pool[sha] = path
        failed |= self.features([(p, s) for s, p in pool.items()], "features (new photos)")
        for path, reason in failed.items():
            self.log(printable(f"skipped {path}: {reason}"))
        self.pool = [(p, s) for s, p in pool.items() if p not in failed]
        self.train_known = self.known([(it.sha256, it.label) for it in train])
        self.val_known = self.known([(it.sha256, it.label) for it in val])
        self.log(f"{len(self.pool)} new photos ({len(paths) - len(pool)} left out: copies of the model's own photos "
                 f"or of each other); the model's {len(train)} training and {len(val)} validation photos")

    def _shipped_fit(self) -> Refit:
        """The model file's own head and verdict: what the photos are ranked by before any label."""
        trust, meta = self.model.trust, self.meta["trust"]
        return Refit(self.model.head.weight.detach().clone(), self.model.head.bias.detach().clone(),
                     float(meta["temperature"]), trust.bank.clone(), trust.val_scores.clone(), float(meta["threshold"]))

    # the rows that a refit reads
    def known(self, pairs: list[tuple[str, str]]) -> Known:
        """(sha256, class) pairs -> feature rows and class indices (photos without a row are left out)."""
        kept = [(self.rows[sha], self.classes.index(label)) for sha, label in pairs if sha in self.rows]
        if not kept:
            return Known.empty(self.model.head.in_features)
        return Known(np.stack([r for r, _ in kept]), np.array([y for _, y in kept], np.int64))

    def parts(self, labels: list[Label] | None = None) -> tuple[Known, Known, Known, np.ndarray]:
        """train, val, labelled (of a class), negatives (labelled "none of these" and the run's
        own); `labels`: these instead of the session's."""
        train, val, labels = self.train_known, self.val_known, self.labels if labels is None else labels
        labelled = self.known([(lb.sha256, lb.label) for lb in labels if lb.label != NONE_LABEL])
        negative = [lb.sha256 for lb in labels if lb.label == NONE_LABEL] + [it.sha256 for it in self.run_negatives]
        rows = [self.rows[s] for s in negative if s in self.rows]
        return train, val, labelled, np.stack(rows) if rows else np.zeros((0, train.x.shape[1]), np.float32)

    # labels: copies into `into`, logged in into/labels.csv
    def _read_labels(self) -> list[Label]:
        """Labels of an earlier session with the same --into (their copies still there) carry on."""
        if self.into is None or not (self.into / LABELS_CSV).is_file():
            return []
        with open(self.into / LABELS_CSV, newline="") as f:
            labels = [Label(r["path"], r["sha256"], r["label"], r["copy"], r["time"]) for r in csv.DictReader(f)
                      if {"path", "sha256", "label", "copy", "time"} <= set(r) and os.path.isfile(r["copy"])]
        labels = [lb for lb in labels if lb.label in self.classes or lb.label == NONE_LABEL]
        self.features([(lb.copy, lb.sha256) for lb in labels], "features (labelled earlier)")
        return labels

    def label(self, sha256: str, label: str) -> Label:
        """Label the new photo with this content: copy it into INTO/<class>/ (INTO/unknown/ for
        "none of these") and log it.  The photo itself is never changed."""
        if self.into is None:
            raise UsageError("give --into DIR: the folder the labelled copies go to")
        if label not in self.classes and label != NONE_LABEL:
            raise UsageError(f"unknown label {label!r}: one of {', '.join(self.classes)} or {NONE_LABEL}")
        source = next((p for p, s in self.pool if s == sha256), None)
        if source is None:
            raise UsageError(f"no new photo has the content {sha256[:16]}...")
        self.undo(sha256, quiet=True)  # labelled again: the new label replaces the old
        copy = _copy_into(source, sha256, self.into / (UNKNOWN if label == NONE_LABEL else label))
        entry = Label(source, sha256, label, str(copy), datetime.now().isoformat(timespec="seconds"))
        self.labels.append(entry)
        self._write_labels()
        return entry

    def undo(self, sha256: str | None = None, quiet: bool = False) -> Label | None:
        """Take back the last label (or the label of this content): its copy is removed."""
        found = next((lb for lb in reversed(self.labels) if sha256 is None or lb.sha256 == sha256), None)
        if found is None:
            return None
        self.labels.remove(found)
        if not any(lb.copy == found.copy for lb in self.labels):
            Path(found.copy).unlink(missing_ok=True)
            if not any(Path(found.copy).parent.iterdir()):  # the folder the label made, now empty
                Path(found.copy).parent.rmdir()
        if not quiet:
            self._write_labels()
        return found

    def _write_labels(self) -> None:
        self.into.mkdir(parents=True, exist_ok=True)
        tmp = self.into / (LABELS_CSV + ".tmp")
        with open(tmp, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["path", "sha256", "label", "copy", "time"])
            w.writerows([lb.source, lb.sha256, lb.label, lb.copy, lb.time] for lb in self.labels)
        tmp.replace(self.into / LABELS_CSV)

    # a refit, its numbers, the new model file
    def refit(self, labelled: Known, negatives: np.ndarray) -> Refit:
        """refit() on the model's photos and these, with the loss weighted per class as the probe's
        (--balance auto) would weight it."""
        from fruitnet.balance import resolve_balance

        train, val = self.parts()[:2]
        counts = {c: int(((train + labelled).y == i).sum()) for i, c in enumerate(self.classes)}
        weights = resolve_balance("auto", counts).class_weights
        return refit(train, val, labelled, negatives, len(self.classes), self.l2, self.recall, weights)

    def retrain(self, lock: threading.Lock | None = None) -> dict:
        """Refit on the model's photos and the labels; write the new model file; return the numbers
        before and after.  With a lock (the page's), it is held only to read the labels and to
        store the result: labelling goes on during the refit."""
        with lock or nullcontext():
            labels = list(self.labels)
            labels_hash = file_sha256(str(self.into / LABELS_CSV)) if self.into and labels else None
        train, val, labelled, negatives = self.parts(labels)
        fit = self.refit(labelled, negatives)
        pool = self.pool_rows()
        fit.numbers = {
            "labelled": {c: int((labelled.y == i).sum()) for i, c in enumerate(self.classes)},
            "none_of_these": sum(lb.label == NONE_LABEL for lb in labels),
            "val_accuracy": {"before": _accuracy(self.shipped, val), "after": _accuracy(fit, val)},
            "labelled_cv_accuracy": cross_validated_accuracy(train, labelled, len(self.classes), self.l2),
            "new_answered": {"before": _answered(self.shipped, pool), "after": _answered(fit, pool)},
            "negatives_rejected": _rejected(fit, negatives),
            "refit_seconds": round(fit.seconds, 2),
        }
        with lock or nullcontext():
            self.fit = fit
            fit.numbers["model"] = str(self.write_model(fit, val, labels, labels_hash))
            self.history.append(fit.numbers)
        return fit.numbers

    def pool_rows(self) -> np.ndarray:
        return np.stack([self.rows[s] for _, s in self.pool]) if self.pool else \
            np.zeros((0, self.model.head.in_features), np.float32)

    def ranking(self, strategy: str = "coverage") -> list[dict]:
        """The new photos not labelled yet, most useful first, each with the model's answer."""
        labelled = {lb.sha256 for lb in self.labels}
        todo = [i for i, (_, s) in enumerate(self.pool) if s not in labelled]
        if not todo:
            return []
        x = self.pool_rows()[todo]
        order = rank(strategy, x, self.fit)
        best, confidence, answered = self.fit.answers(x)
        in_dist = self.fit.in_distribution(x)
        return [{"path": self.pool[todo[i]][0], "sha256": self.pool[todo[i]][1],
                 "label": self.classes[best[i]] if answered[i] else UNKNOWN, "best_guess": self.classes[best[i]],
                 "confidence": round(float(confidence[i]), 4), "in_distribution": round(float(in_dist[i]), 4)}
                for i in order]

    def write_model(self, fit: Refit, val: Known, labels: list[Label], labels_hash: str | None) -> Path:
        """OUT/best.safetensors (the taught model, its lineage in the metadata), OUT/split.csv (the
        photos it was fitted on: a later teach session starts from it) and OUT/teach.json."""
        from fruitnet.calibration import calibration_summary
        from fruitnet.model import save_model
        from fruitnet.unknown import UnknownVerdict

        out = self._out_folder()
        with torch.no_grad():
            self.model.head.weight.copy_(fit.weight)
            self.model.head.bias.copy_(fit.bias)
        self.model.trust = UnknownVerdict(fit.val_scores, fit.bank)
        val_logits = (torch.from_numpy(val.x).float() @ fit.weight.T + fit.bias).numpy()
        accepted = float((self.model.trust.in_distribution(fit.val_scores) >= fit.threshold).float().mean())
        trust = {"temperature": fit.temperature, "score": "knn", "threshold": fit.threshold, "recall": self.recall,
                 "n_val": len(fit.val_scores), "val_accepted": accepted,
                 "val_calibration": calibration_summary(val_logits, val.y, fit.temperature)}
        taught = {"from": str(self.model_path.resolve()), "from_sha256": file_sha256(str(self.model_path)),
                  "labels_sha256": labels_hash, "labels": len(labels),
                  "labelled": fit.numbers.get("labelled"), "none_of_these": fit.numbers.get("none_of_these"),
                  "at": datetime.now().isoformat(timespec="seconds")}
        photos = set(self.meta.get("training_photos") or []) | {lb.sha256[:16] for lb in labels}
        meta = {**self.meta, "trust": trust, "taught": taught, "training_photos": sorted(photos),
                "training": {"val_accuracy": fit.numbers["val_accuracy"]["after"]}}
        save_model(out / "best.safetensors", self.model, meta)
        self._write_split(out / "split.csv", labels)
        (out / "teach.json").write_text(json.dumps({"taught": taught, "history": self.history + [fit.numbers]},
                                                   indent=2))
        return out / "best.safetensors"

    def _write_split(self, path: Path, labels: list[Label]) -> None:
        from fruitnet.dataset import Item, write_split

        added = [Item(lb.copy, UNKNOWN if lb.label == NONE_LABEL else lb.label, lb.sha256, source=str(self.into))
                 for lb in labels]
        write_split(path, self.train_items + [it for it in added if it.label != UNKNOWN], self.val_items,
                    self.run_negatives + [it for it in added if it.label == UNKNOWN])

    def _out_folder(self) -> Path:
        from fruitnet.runfolder import new_output_folder

        if self.out is None or not self.out.is_dir():
            self.out = new_output_folder(self.out, "teach-", [], "teach run folder")
        return self.out


def _accuracy(fit: Refit, known: Known) -> float | None:
    return float((fit.probabilities(known.x).argmax(1) == known.y).mean()) if len(known) else None


def _answered(fit: Refit, x: np.ndarray) -> float | None:
    return float(fit.answers(x)[2].mean()) if len(x) else None


def _rejected(fit: Refit, x: np.ndarray) -> float | None:
    return float((fit.in_distribution(x) < fit.threshold).mean()) if len(x) else None


def _copy_into(source: str, sha256: str, folder: Path) -> Path:
    """A copy of source in folder under its own name, or NAME-<sha8>.EXT where another file has the
    name; the same content already there is not copied twice."""
    folder.mkdir(parents=True, exist_ok=True)
    name = Path(source).name
    target = folder / name
    if target.exists() and file_sha256(str(target)) != sha256:
        target = folder / f"{Path(name).stem}-{sha256[:8]}{Path(name).suffix}"
    if not target.exists():
        shutil.copyfile(source, target.with_name(target.name + ".tmp"))
        target.with_name(target.name + ".tmp").replace(target)
    return target


def _default_cache() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "fruitnet" / "features"


def _run_weight_decay(model_path: Path) -> float:
    """The L2 weight the model's head was fitted with (its run's config.json), else the probe's."""
    from fruitnet.config import RECIPES

    try:
        return float(json.loads((model_path.parent / "config.json").read_text())["train"]["weight_decay"])
    except (OSError, ValueError, KeyError, TypeError):
        return RECIPES["probe"].weight_decay


def read_label_file(path: str | Path, teacher: Teacher) -> list[tuple[str, str]]:
    """(sha256, label) for every row of a CSV with columns path,label (label: a class or "none"),
    each path one of the session's new photos; UsageError naming every row that is not."""
    try:
        with open(path, newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f))
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise UsageError(f"{path}: cannot read the labels ({exc})") from None
    if rows and not {"path", "label"} <= set(rows[0]):
        raise UsageError(f"{path}: needs the columns path,label (found {', '.join(rows[0])})")
    new = {os.path.realpath(p): s for p, s in teacher.pool}
    by_hash = {s for _, s in teacher.pool}
    found, problems = [], []
    for n, row in enumerate(rows, start=2):
        where = f"{path}:{n}: {row['path']}"
        sha = new.get(os.path.realpath(row["path"] or ""))
        if sha is None and os.path.isfile(row["path"] or ""):
            sha = file_sha256(row["path"]) if file_sha256(row["path"]) in by_hash else None
        if sha is None:
            problems.append(f"{where}: not one of the new photos")
        elif row["label"] not in teacher.classes and row["label"] != NONE_LABEL:
            problems.append(f"{where}: label {row['label']!r} is none of {', '.join(teacher.classes)}, {NONE_LABEL}")
        else:
            found.append((sha, row["label"]))
    if problems:
        more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
        raise UsageError("; ".join(problems[:3]) + more)
    return found


def format_numbers(numbers: dict) -> str:
    """A refit's numbers, for the console."""
    pct = lambda x: "-" if x is None else f"{x:.1%}"  # noqa: E731
    labelled = ", ".join(f"{c} {n}" for c, n in numbers["labelled"].items())
    return "\n".join([
        f"labelled: {labelled}; none of these {numbers['none_of_these']}",
        f"validation accuracy (the model's own validation photos): {pct(numbers['val_accuracy']['before'])} -> "
        f"{pct(numbers['val_accuracy']['after'])}",
        f"labelled photos, cross-validated accuracy: {pct(numbers['labelled_cv_accuracy'])}",
        f"new photos answered (not 'unknown'): {pct(numbers['new_answered']['before'])} -> "
        f"{pct(numbers['new_answered']['after'])}",
        *([f"'none of these' photos answered 'unknown': {pct(numbers['negatives_rejected'])}"]
          if numbers["negatives_rejected"] is not None else []),
        f"refit in {numbers['refit_seconds']:.1f}s; taught model: {numbers['model']}"])
