"""Predictors: a model file in, probabilities out, behind one small interface.

Every consumer (predict, evaluate, serve, export's parity check) talks to a Predictor:
- `classes`, `meta` (the model file's metadata) and `preprocessing` (from that metadata);
- `transform(image)`: PIL RGB -> normalised tensor, built from the metadata, never re-typed;
- `logits(batch)`: the forward pass, the one thing each runtime does its own way;
- `probabilities(images)`, `predict_paths(paths)`, `describe(row)`: shared, built on the above.

`TorchPredictor` runs a .safetensors file (or the original project's model.pth) with PyTorch,
`OnnxPredictor` an exported .onnx file with onnxruntime; `load_predictor` picks one.
"""

from __future__ import annotations

import glob
import json
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from PIL import Image

from fruitnet.arithmetic import choose, resolve_device
from fruitnet.errors import ImageError, ModelFileError
from fruitnet.images import is_hidden, load_image, looks_like_image
from fruitnet.model import load_model, validate_meta
from fruitnet.transforms import eval_transform

ONNX_META_KEY = "fruitnet"  # the ONNX metadata_props key that carries the model file's metadata


class Predictor:
    """The shared half: preprocessing, decoding in threads, batching, describing a result.

    Subclasses set `meta` and implement `logits` and `runtime`.
    """

    meta: dict

    def __init__(self, meta: dict):
        self.meta = meta
        self.classes: list[str] = meta["classes"]
        self.preprocessing: dict = meta["preprocessing"]
        self.transform = eval_transform(self.preprocessing)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """A normalised image batch -> logits (float32, on the CPU)."""
        raise NotImplementedError

    def runtime(self) -> dict:
        """What runs the forward pass, for reports: {"runtime", "arithmetic"}."""
        raise NotImplementedError

    def load(self, path) -> Image.Image:
        return load_image(path)  # full decode, exactly as in training (no JPEG draft shortcuts)

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
        except MemoryError:
            return "not enough memory to process it"
        except Exception as exc:  # whatever goes wrong with one file is that file's error, not the batch's
            return f"cannot be processed ({exc.__class__.__name__}: {exc})"

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


class TorchPredictor(Predictor):
    """A .safetensors model file (or the original model.pth) run by PyTorch.

    precision 'fp32' (exact, the library default), 'bf16' or 'auto' (bf16 where native: faster)."""

    def __init__(self, model_path: str | Path, device: str = "auto", legacy: bool | None = None,
                 precision: str = "fp32"):
        self.model, meta = load_model(model_path, legacy=legacy)
        super().__init__(meta)
        self.device = resolve_device(device)
        self.arith = choose(precision, self.device)
        self.arith.prepare_model(self.model.to(self.device).eval())

    @torch.inference_mode()
    def logits(self, x: torch.Tensor) -> torch.Tensor:
        with self.arith.autocast(self.device):
            return self.model(self.arith.prepare_input(x.to(self.device))).float().cpu()

    def runtime(self) -> dict:
        return {"runtime": "pytorch", "arithmetic": self.arith.as_dict()}


class OnnxPredictor(Predictor):
    """An exported .onnx file run by onnxruntime; metadata and preprocessing read from the file."""

    def __init__(self, onnx_path: str | Path, threads: int = 0):
        import onnxruntime as ort

        path = Path(onnx_path)
        if not path.is_file():
            raise ModelFileError(f"{path}: ONNX file not found")
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads  # 0: onnxruntime's default (all cores)
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")  # leave idle cores to decoding
        try:
            self.session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        except Exception as exc:  # onnxruntime raises its own types for unreadable files
            raise ModelFileError(f"{path}: not a readable ONNX file ({exc.__class__.__name__}: {exc})") from None
        text = self.session.get_modelmeta().custom_metadata_map.get(ONNX_META_KEY)
        if text is None:
            raise ModelFileError(f"{path}: ONNX file without fruitnet metadata (not made by fruitnet export)")
        try:
            meta = json.loads(text)
        except (ValueError, RecursionError) as exc:
            raise ModelFileError(f"{path}: unreadable fruitnet metadata ({exc.__class__.__name__}: {exc})") from None
        validate_meta(meta, path)
        self._check_shapes(path, meta)
        super().__init__(meta)
        self.input_name = self.session.get_inputs()[0].name

    def _check_shapes(self, path: Path, meta: dict) -> None:
        """The graph's input and output must be what the metadata says (named axes such as 'batch' match anything)."""
        inputs, outputs = self.session.get_inputs(), self.session.get_outputs()
        size = meta["preprocessing"]["input_size"]
        want_in, want_out = [None, 3, size, size], [None, len(meta["classes"])]
        for what, got, want in (("input", inputs[0].shape if inputs else None, want_in),
                                ("output", outputs[0].shape if outputs else None, want_out)):
            if got is None or len(got) != len(want) or any(
                    isinstance(g, int) and w is not None and g != w for g, w in zip(got, want)):
                raise ModelFileError(f"{path}: the graph's {what} has shape {got}, but the metadata "
                                     f"({len(meta['classes'])} classes, input_size {size}) needs {want}")

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(self.session.run(None, {self.input_name: x.numpy()})[0]).float()

    def runtime(self) -> dict:
        return {"runtime": "onnxruntime", "arithmetic": "fp32 (onnxruntime, CPU)"}


def load_predictor(path: str | Path, runtime: str = "auto", legacy: bool | None = None,
                   precision: str = "fp32", device: str = "auto") -> Predictor:
    """runtime 'torch', 'onnx', or 'auto' (onnx for a .onnx file); precision and device apply to torch."""
    if runtime == "onnx" or (runtime == "auto" and str(path).lower().endswith(".onnx")):
        return OnnxPredictor(path)
    return TorchPredictor(path, device=device, legacy=legacy, precision=precision)


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
