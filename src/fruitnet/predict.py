"""One Predictor used by predict, evaluate and serve; its transform comes from the model file."""

from __future__ import annotations

import glob
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from PIL import Image

from fruitnet.arithmetic import choose, resolve_device
from fruitnet.images import ImageError, is_hidden, load_image, looks_like_image
from fruitnet.model import load_model
from fruitnet.transforms import eval_transform


class Predictor:
    """precision 'fp32' (exact, the library default), 'bf16' or 'auto' (bf16 where native: faster)."""

    def __init__(self, model_path: str | Path, device: str = "auto", legacy: bool | None = None,
                 precision: str = "fp32"):
        self.model, self.meta = load_model(model_path, legacy=legacy)
        self.classes: list[str] = self.meta["classes"]
        self.device = resolve_device(device)
        self.arith = choose(precision, self.device)
        self.arith.prepare_model(self.model.to(self.device).eval())
        self.transform = eval_transform(self.meta["preprocessing"])

    def load(self, path) -> Image.Image:
        return load_image(path)  # full decode, exactly as in training (no JPEG draft shortcuts)

    @torch.inference_mode()
    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """A normalised image batch -> logits (float32, on the CPU)."""
        with self.arith.autocast(self.device):
            return self.model(self.arith.prepare_input(x.to(self.device))).float().cpu()

    def probabilities(self, images: list) -> torch.Tensor:
        """PIL RGB images -> (n, classes) softmax probabilities."""
        return self.logits(torch.stack([self.transform(im) for im in images])).softmax(1)

    def _prepare(self, path) -> torch.Tensor | str:
        """Decode and transform one file (runs in a thread: PIL works without the GIL); an error is a str."""
        try:
            return self.transform(self.load(path))
        except ImageError as exc:
            return exc.reason
        except OSError as exc:
            return f"cannot read file ({exc.strerror or exc})"

    def predict_paths(self, paths: list[str], batch_size: int = 32, progress=None) -> list[dict]:
        """[{path, label, probabilities}] or [{path, error}] per path, in order; never raises for a bad file.

        The next batch is decoded by threads while the model runs on this one; at most two
        batches are in memory, however many paths there are.
        """
        chunks = [paths[i:i + batch_size] for i in range(0, len(paths), batch_size)]
        results: list[dict] = []
        with ThreadPoolExecutor(max(2, os.cpu_count() or 2)) as pool:
            pending = pool.map(self._prepare, chunks[0]) if chunks else None
            for k, chunk in enumerate(chunks):
                prepared = list(pending)
                if k + 1 < len(chunks):
                    pending = pool.map(self._prepare, chunks[k + 1])
                out = [{"path": str(p)} if isinstance(t, torch.Tensor) else {"path": str(p), "error": t}
                       for p, t in zip(chunk, prepared)]
                good = [i for i, t in enumerate(prepared) if isinstance(t, torch.Tensor)]
                if good:
                    probs = self.logits(torch.stack([prepared[i] for i in good])).softmax(1)
                    for i, row in zip(good, probs):
                        out[i].update(self.describe(row))
                results.extend(out)
                if progress is not None:
                    progress(len(chunk))
        return results

    def describe(self, probs: torch.Tensor) -> dict:
        return {"label": self.classes[int(probs.argmax())],
                "probabilities": {c: float(p) for c, p in zip(self.classes, probs)}}


def expand_paths(patterns: list[str]) -> tuple[list[str], list[dict]]:
    """Files, folders (recursively, skipping hidden entries and non-images) and globs.

    Returns (paths, problems) where problems are {path, error} for patterns that matched nothing.
    """
    paths, problems = [], []
    for pattern in patterns:
        if os.path.isdir(pattern):
            found = sorted(str(p) for p in Path(pattern).rglob("*")
                           if p.is_file() and not is_hidden(p.relative_to(pattern)) and looks_like_image(p))
        elif os.path.exists(pattern):
            found = [pattern]
        else:
            found = sorted(p for p in glob.glob(pattern, recursive=True) if os.path.isfile(p))
        if not found:
            problems.append({"path": pattern, "error": "no such file, or no images there"})
        paths.extend(found)
    return paths, problems
