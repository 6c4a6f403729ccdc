"""Predictors: a model file in, probabilities out, behind one small interface.

Every consumer (predict, evaluate, serve, export's parity check) talks to a Predictor:
- `classes`, `meta` (the model file's metadata) and `preprocessing` (from that metadata);
- `transform(image)`: PIL RGB -> normalised tensor, built from the metadata, never re-typed;
- `forward(batch)`: logits, and where the model file has them the in-distribution score and
  share (ood.TrustHead); the one thing each runtime does its own way;
- `outputs(batch)`, `probabilities(images)`, `predict_paths(paths)`, `describe(row)`: shared,
  built on the above. Probabilities are calibrated (the logits divided by the model file's
  temperature, 1 for files made before calibration), and a photo whose in_distribution is below
  the file's threshold is labelled "unknown", its best class kept as `best_guess`.

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
UNKNOWN = "unknown"  # the label of a photo that looks like none of the classes


class Predictor:
    """The shared half: preprocessing, decoding in threads, batching, describing a result.

    Subclasses set `meta` and implement `logits` and `runtime`.
    """

    meta: dict

    explain_unavailable: str | None = None  # why this runtime cannot draw heat maps (None: it can)

    def __init__(self, meta: dict, unknown: bool = True):
        self.meta = meta
        self.classes: list[str] = meta["classes"]
        self.preprocessing: dict = meta["preprocessing"]
        self.transform = eval_transform(self.preprocessing)
        trust = meta.get("trust") or {}
        self.temperature = float(trust.get("temperature", 1.0))  # files made before calibration: 1
        self.threshold: float | None = trust.get("threshold")  # None: no in-distribution statistics
        self.unknown = unknown and self.threshold is not None  # False: never answer "unknown" (--no-unknown)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """A normalised image batch -> (logits, score, in_distribution), float32 on the CPU; the
        last two are None for a model file without in-distribution statistics."""
        raise NotImplementedError

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward(x)[0]

    def outputs(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(calibrated probabilities, in_distribution or None) for a normalised image batch."""
        logits, _, in_dist = self.forward(x)
        return (logits / self.temperature).softmax(1), in_dist

    def runtime(self) -> dict:
        """What runs the forward pass, for reports: {"runtime", "arithmetic"}."""
        raise NotImplementedError

    def load(self, path) -> Image.Image:
        return load_image(path)  # full decode, exactly as in training (no JPEG draft shortcuts)

    def probabilities(self, images: list) -> torch.Tensor:
        """PIL RGB images -> (n, classes) calibrated probabilities."""
        return self.outputs(torch.stack([self.transform(im) for im in images]))[0]

    def heat_maps(self, x: torch.Tensor, targets: list[int]):
        """(n, H, W) Grad-CAM heat maps in [0, 1] for a normalised batch and the target classes."""
        from fruitnet.explain import ExplainUnavailable

        raise ExplainUnavailable(self.explain_unavailable or "this runtime cannot draw heat maps")

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

    def predict_paths(self, paths: list[str], batch_size: int = 32, progress=None, raw: bool = False) -> list[dict]:
        """[{path, label, probabilities, ...}] (see describe) or [{path, error}] per path, in order;
        never raises for a bad file. raw=True adds each photo's uncalibrated "logits" and raw "score".

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
                    logits, score, in_dist = self.forward(torch.stack([prepared[i] for i in good]))
                    probs = (logits / self.temperature).softmax(1)
                    for k, i in enumerate(good):
                        out[i].update(self.describe(probs[k], None if in_dist is None else in_dist[k]))
                        if raw:
                            out[i].update(logits=logits[k].tolist(),
                                          score=None if score is None else float(score[k]))
                results.extend(out)
                if progress is not None:
                    progress(len(chunk))
        return results

    def describe(self, probs: torch.Tensor, in_dist: torch.Tensor | None = None) -> dict:
        """{label, probabilities} and, where the model file has in-distribution statistics,
        best_guess and in_distribution; label is "unknown" when in_distribution is below the threshold."""
        best = self.classes[int(probs.argmax())]
        result = {"label": best, "probabilities": {c: float(p) for c, p in zip(self.classes, probs)}}
        if in_dist is not None:
            in_dist = float(in_dist)
            known = not self.unknown or in_dist >= self.threshold
            result.update(label=best if known else UNKNOWN, best_guess=best, in_distribution=round(in_dist, 4))
        return result

    def trust_info(self) -> dict:
        """For reports: temperature, threshold and whether the unknown verdict is on."""
        trust = self.meta.get("trust") or {}
        return {"temperature": self.temperature, "unknown_verdict": self.unknown, "threshold": self.threshold,
                "score": trust.get("score"), "recall": trust.get("recall")}


class TorchPredictor(Predictor):
    """A .safetensors model file (or the original model.pth) run by PyTorch.

    precision 'fp32' (exact, the library default), 'bf16' or 'auto' (bf16 where native: faster)."""

    def __init__(self, model_path: str | Path, device: str = "auto", legacy: bool | None = None,
                 precision: str = "fp32", unknown: bool = True):
        self.model, meta = load_model(model_path, legacy=legacy)
        super().__init__(meta, unknown)
        self.device = resolve_device(device)
        self.arith = choose(precision, self.device)
        self.arith.prepare_model(self.model.to(self.device).eval())
        self._gradcam = None

    @torch.inference_mode()
    def forward(self, x: torch.Tensor):
        with self.arith.autocast(self.device):
            logits = self.model(self.arith.prepare_input(x.to(self.device))).float()
        if self.model.trust is None:
            return logits.cpu(), None, None
        score, in_dist = self.model.trust(logits)  # fp32, outside autocast
        return logits.cpu(), score.cpu(), in_dist.cpu()

    def heat_maps(self, x: torch.Tensor, targets: list[int]):
        from fruitnet.explain import GradCam

        if self._gradcam is None:
            self._gradcam = GradCam(self.model, self.preprocessing)
        return self._gradcam.heat(x, targets)

    def runtime(self) -> dict:
        return {"runtime": "pytorch", "arithmetic": self.arith.as_dict()}


class OnnxPredictor(Predictor):
    """An exported .onnx file run by onnxruntime; metadata and preprocessing read from the file."""

    explain_unavailable = ("heat maps need the PyTorch model file (.safetensors): Grad-CAM needs gradients, "
                           "which an exported ONNX file does not give")

    def __init__(self, onnx_path: str | Path, threads: int = 0, unknown: bool = True):
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
        super().__init__(meta, unknown)
        self.input_name = self.session.get_inputs()[0].name
        names = {o.name for o in self.session.get_outputs()}
        # files exported before calibration have only "logits"
        self.output_names = ["logits"] + (["score", "in_distribution"] if {"score", "in_distribution"} <= names else [])

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

    def forward(self, x: torch.Tensor):
        out = [torch.from_numpy(a).float() for a in self.session.run(self.output_names, {self.input_name: x.numpy()})]
        return (out[0], out[1], out[2]) if len(out) == 3 else (out[0], None, None)

    def runtime(self) -> dict:
        return {"runtime": "onnxruntime", "arithmetic": "fp32 (onnxruntime, CPU)"}


def load_predictor(path: str | Path, runtime: str = "auto", legacy: bool | None = None,
                   precision: str = "fp32", device: str = "auto", unknown: bool = True) -> Predictor:
    """runtime 'torch', 'onnx', or 'auto' (onnx for a .onnx file); precision and device apply to torch;
    unknown=False never answers "unknown" (the in_distribution share is still given)."""
    if runtime == "onnx" or (runtime == "auto" and str(path).lower().endswith(".onnx")):
        return OnnxPredictor(path, unknown=unknown)
    return TorchPredictor(path, device=device, legacy=legacy, precision=precision, unknown=unknown)


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
