"""One Predictor used by predict, evaluate and serve; its transform comes from the model file."""

from __future__ import annotations

import glob
import os
from pathlib import Path

import torch

from fruitnet.images import ImageError, is_hidden, load_image, looks_like_image
from fruitnet.model import load_model
from fruitnet.transforms import eval_transform


class Predictor:
    def __init__(self, model_path: str | Path, device: str = "auto", legacy: bool | None = None):
        self.model, self.meta = load_model(model_path, legacy=legacy)
        self.classes: list[str] = self.meta["classes"]
        self.device = torch.device("cuda" if device == "auto" and torch.cuda.is_available() else
                                   ("cpu" if device == "auto" else device))
        self.model.to(self.device).eval()
        self.transform = eval_transform(self.meta["preprocessing"])

    def load(self, path) -> "PIL.Image.Image":
        return load_image(path)  # full decode, exactly as in training (no JPEG draft shortcuts)

    @torch.inference_mode()
    def probabilities(self, images: list) -> torch.Tensor:
        """PIL RGB images -> (n, classes) softmax probabilities."""
        x = torch.stack([self.transform(im) for im in images]).to(self.device)
        return self.model(x).float().softmax(1).cpu()

    def predict_paths(self, paths: list[str], batch_size: int = 32, progress=None) -> list[dict]:
        """[{path, label, probabilities}] or [{path, error}] per path, in order; never raises for a bad file."""
        results: list[dict] = []
        for start in range(0, len(paths), batch_size):
            chunk, images, ok = paths[start:start + batch_size], [], []
            out: list[dict] = []
            for p in chunk:
                try:
                    images.append(self.load(p))
                    ok.append(len(out))
                    out.append({"path": str(p)})
                except ImageError as exc:
                    out.append({"path": str(p), "error": exc.reason})
                except OSError as exc:
                    out.append({"path": str(p), "error": f"cannot read file ({exc.strerror or exc})"})
            if images:
                probs = self.probabilities(images)
                for i, row in zip(ok, probs):
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
