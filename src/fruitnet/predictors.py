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

import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from PIL import Image

from fruitnet.arithmetic import choose, resolve_device
from fruitnet.errors import ModelFileError
from fruitnet.images import expand_paths  # noqa: F401  (here for the callers that import it from here)
from fruitnet.model import load_model
from fruitnet.preprocess import DecodeAhead, load, small_image_warning
from fruitnet.transforms import TensorTransform, eval_transform, hwc_to_tensor

# bf16: a photo whose top two probabilities are closer than this is run again in fp32.  Measured on
# webfruit (README, bf16 and fp32): bf16 moved a probability by at most 0.047, and the labels it
# flipped had bf16 margins up to 0.027; twice that is re-checked.
NEAR_TIE = 0.05
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
        self.transform = eval_transform(self.preprocessing)  # PIL image -> model input
        self.finish = TensorTransform(self.preprocessing)  # uint8 model input (DecodeAhead) -> model input

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """A normalised image batch -> logits (float32, on the CPU)."""
        raise NotImplementedError

    def runtime(self) -> dict:
        """What runs the forward pass, for reports: {"runtime", "arithmetic"}."""
        raise NotImplementedError

    def load(self, path) -> Image.Image:
        """A file decoded as in training (preprocess.load: a JPEG draft decode where the model's
        preprocessing says so); ImageError if it cannot be used."""
        return load(path, self.preprocessing)

    def probabilities(self, images: list) -> torch.Tensor:
        """PIL RGB images -> (n, classes) softmax probabilities."""
        return self.logits(torch.stack([self.transform(im) for im in images])).softmax(1)

    def predict_paths(self, paths: list[str], batch_size: int = 32, progress=None,
                      decoded: DecodeAhead | None = None) -> list[dict]:
        """[{path, label, probabilities[, warning]}] or [{path, error}] per path, in order; never
        raises for a bad file.  `warning` flags a photo much smaller than the model's input.

        Files are decoded by threads ahead of the model (a bounded window: memory stays flat
        however many paths there are); `decoded` is such a decoder started earlier, over the same
        paths with the same preprocessing (the CLI starts it before the model has loaded).
        """
        decoded = decoded if decoded is not None else DecodeAhead(paths, self.preprocessing)
        results: list[dict] = []
        # The last step (uint8 -> normalised tensor) also runs in threads, one image each: done in
        # this thread, OpenMP's spin-waiting made the model itself 1.5x slower on a busy machine.
        with decoded, ThreadPoolExecutor(2) as finishing:
            for start in range(0, len(paths), batch_size):
                chunk = paths[start:start + batch_size]
                prepared = [next(decoded) for _ in chunk]
                out = [{"path": str(p), "error": d} if isinstance(d, str) else {"path": str(p)}
                       for p, d in zip(chunk, prepared)]
                good = [i for i, d in enumerate(prepared) if not isinstance(d, str)]
                if good:
                    x = torch.stack(list(finishing.map(self._to_input, [prepared[i][0] for i in good])))
                    for i, row in zip(good, self.logits(x).softmax(1)):
                        out[i].update(self.describe(row))
                        warning = small_image_warning(prepared[i][1], self.preprocessing)
                        if warning:
                            out[i]["warning"] = warning
                results.extend(out)
                if progress is not None:
                    progress(len(chunk))
        return results

    def _to_input(self, array) -> torch.Tensor:
        return self.finish(hwc_to_tensor(array))

    def describe(self, probs: torch.Tensor) -> dict:
        return {"label": self.classes[int(probs.argmax())],
                "probabilities": {c: float(p) for c, p in zip(self.classes, probs)}}


class TorchPredictor(Predictor):
    """A .safetensors model file (or the original model.pth) run by PyTorch.

    precision 'fp32' (exact, the library default), 'bf16' or 'auto' (bf16 where native: faster).
    Under bf16, photos whose top two probabilities are within NEAR_TIE are run again in fp32
    (recheck_near_ties), so labels agree with fp32 and ONNX."""

    def __init__(self, model_path: str | Path, device: str = "auto", legacy: bool | None = None,
                 precision: str = "fp32", recheck_near_ties: bool = True):
        self.model, meta = load_model(model_path, legacy=legacy)
        super().__init__(meta)
        self.device = resolve_device(device)
        self.arith = choose(precision, self.device)
        self.arith.prepare_model(self.model.to(self.device).eval())
        self.recheck_near_ties = recheck_near_ties  # bf16 only: see logits

    @torch.inference_mode()
    def logits(self, x: torch.Tensor) -> torch.Tensor:
        x = self.arith.prepare_input(x.to(self.device))
        with self.arith.autocast(self.device):
            logits = self.model(x).float()
        if self.arith.dtype == "bf16" and self.recheck_near_ties:
            # bf16 rounding can flip a near-tie: those few photos are run again in fp32, so labels
            # agree with fp32 and ONNX.
            top2 = logits.softmax(1).topk(min(2, logits.shape[1]), dim=1).values
            close = (top2[:, 0] - top2[:, -1]) < NEAR_TIE
            if close.any():
                logits[close] = self.model(x[close]).float()
        return logits.cpu()

    def runtime(self) -> dict:
        near_ties = {"near_ties": f"run again in fp32 (top two within {NEAR_TIE})"} \
            if self.arith.dtype == "bf16" and self.recheck_near_ties else {}
        return {"runtime": "pytorch", "arithmetic": {**self.arith.as_dict(), **near_ties}}


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
            meta = json.loads(self.session.get_modelmeta().custom_metadata_map[ONNX_META_KEY])
        except KeyError:
            raise ModelFileError(f"{path}: ONNX file without fruitnet metadata (not made by fruitnet export)") from None
        except Exception as exc:  # onnxruntime raises its own types for unreadable files
            raise ModelFileError(f"{path}: not a readable ONNX file ({exc.__class__.__name__}: {exc})") from exc
        super().__init__(meta)
        self.input_name = self.session.get_inputs()[0].name

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
