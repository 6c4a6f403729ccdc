"""Predictors: a model file in, probabilities out, behind one small interface.

Every consumer (predict, evaluate, serve, export's parity check) talks to a Predictor:
- `classes`, `meta` (the model file's metadata) and `preprocessing` (from that metadata);
- `transform(image)`: PIL RGB -> normalised tensor, built from the metadata, never re-typed;
- `forward(batch)`: logits, and where the model file has them the in-distribution score and
  share (unknown.UnknownVerdict); the one thing each runtime does its own way;
- `outputs(batch)`, `probabilities(images)`, `predict_paths(paths)`, `describe(row)`: shared,
  built on the above. Probabilities are calibrated (the logits divided by the model file's
  temperature, 1 for files made before calibration), and a photo whose in_distribution is below
  the file's threshold is labelled "unknown", its best class kept as `best_guess`.

`TorchPredictor` runs a .safetensors file (or the original project's model.pth) with PyTorch,
`OnnxPredictor` an exported .onnx file with onnxruntime; `load_predictor` picks one.
With tta (test-time augmentation, `--tta`) each photo's logits are averaged with its mirror
image's: TorchPredictor wraps its model in tta.TTA; an ONNX file has it in its graph when it
was exported with `fruitnet export --tta`.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from PIL import Image

from fruitnet.arithmetic import choose_arithmetic, resolve_device
from fruitnet.config import InferenceOptions
from fruitnet.errors import ModelFileError, UsageError
from fruitnet.images import expand_paths  # noqa: F401  (here for the callers that import it from here)
from fruitnet.model import UNKNOWN, fold_batchnorm, fuse_conv_activations, load_model, validate_meta
from fruitnet.preprocess import DecodeAhead, load, small_image_warning
from fruitnet.transforms import eval_transform, input_batches

# bf16: a photo whose top two probabilities are closer than this is run again in fp32.  Measured on
# webfruit (bf16 and fp32; no bench file, see docs/results.md): bf16 moved a probability by at most 0.047, and the labels it
# flipped had bf16 margins up to 0.027; twice that is re-checked.
NEAR_TIE = 0.05
ONNX_META_KEY = "fruitnet"  # the ONNX metadata_props key that carries the model file's metadata


class Predictor:
    """The shared half: preprocessing, decoding in threads, batching, describing a result.

    Subclasses set `meta` and implement `logits` and `runtime`.
    """

    meta: dict
    tta: bool = False  # each photo's logits averaged with its mirror image's (test-time augmentation)

    explain_unavailable: str | None = None  # why this runtime cannot draw heat maps (None: it can)

    def __init__(self, meta: dict, unknown: bool = True):
        self.meta = meta
        self.classes: list[str] = meta["classes"]
        self.preprocessing: dict = meta["preprocessing"]
        self.transform = eval_transform(self.preprocessing)  # PIL image -> model input
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
        """What runs the forward pass, for reports: {"runtime", "arithmetic", "tta"}."""
        raise NotImplementedError

    def check_runs(self, path) -> None:
        """One forward pass on seeded noise (a blank input leaves the features near 0, where
        overflowing weights go unnoticed): ModelFileError if it fails or gives NaN or infinity (a
        graph that asks for 48 GB, weights that overflow), so such a file is refused when it is
        loaded, not at every photo."""
        size = self.preprocessing["input_size"]
        try:
            outputs = self.forward(torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(0)))
        except Exception as exc:
            raise ModelFileError(f"{path}: the model does not run ({exc.__class__.__name__}: "
                                 f"{str(exc).splitlines()[0] if str(exc) else ''})") from None
        if not all(bool(torch.isfinite(t).all()) for t in outputs if t is not None):
            raise ModelFileError(f"{path}: the model's outputs are NaN or infinite; it cannot give meaningful answers")

    def load(self, path) -> Image.Image:
        """A file decoded as in training (preprocess.load: a JPEG draft decode where the model's
        preprocessing says so); ImageError if it cannot be used."""
        return load(path, self.preprocessing)

    def probabilities(self, images: list) -> torch.Tensor:
        """PIL RGB images -> (n, classes) calibrated probabilities."""
        return self.outputs(torch.stack([self.transform(im) for im in images]))[0]

    def heat_maps(self, x: torch.Tensor, targets: list[int]):
        """(n, H, W) Grad-CAM heat maps in [0, 1] for a normalised batch and the target classes."""
        from fruitnet.explain import ExplainUnavailable

        raise ExplainUnavailable(self.explain_unavailable or "this runtime cannot draw heat maps")

    def predict_paths(self, paths: list[str], batch_size: int = 32, progress=None, raw: bool = False,
                      decoded: DecodeAhead | None = None) -> list[dict]:
        """[{path, label, probabilities, ...}] (see describe) or [{path, error}] per path, in order;
        never raises for a bad file. raw=True adds each photo's uncalibrated "logits" and raw "score".
        `warning` flags a photo much smaller than the model's input.

        Files are decoded by threads ahead of the model (transforms.input_batches); `decoded` is
        such a decoder started earlier, over the same paths with the same preprocessing (the CLI
        starts it before the model has loaded).
        """
        results: list[dict] = []
        chunks = input_batches(paths, self.preprocessing, batch_size, decoded)
        for start, (prepared, x) in zip(range(0, len(paths), batch_size), chunks):
            out = [{"path": str(p), "error": d} if isinstance(d, str) else {"path": str(p)}
                   for p, d in zip(paths[start:start + batch_size], prepared)]
            good = [i for i, d in enumerate(prepared) if not isinstance(d, str)]
            if good:
                logits, score, in_dist = self.forward(x)
                probs = (logits / self.temperature).softmax(1)
                for k, i in enumerate(good):
                    out[i].update(self.describe(probs[k], None if in_dist is None else in_dist[k]))
                    if raw:
                        out[i].update(logits=logits[k].tolist(), score=None if score is None else float(score[k]))
                    warning = small_image_warning(prepared[i][1], self.preprocessing)
                    if warning:
                        out[i]["warning"] = warning
            results.extend(out)
            if progress is not None:
                progress(len(prepared))
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

    precision 'fp32' (exact, the library default), 'bf16' or 'auto' (bf16 where native: faster).
    Under bf16 the body runs with its BatchNorm folded into the convolutions (model.fold_batchnorm)
    and, on the CPU, each ReLU6 inside its convolution (model.fuse_conv_activations); photos whose
    top two probabilities are within NEAR_TIE, or whose in-distribution score is near the verdict's
    threshold (unknown.VERDICT_MARGIN), are run again in fp32 (recheck_near_ties), so labels and
    unknown verdicts agree with fp32 and ONNX.

    tta=True: each photo's logits are the average of the photo's and its mirror image's
    (tta.TTA, mirror only; twice the compute); `net` is what runs, `model` stays the plain
    classifier (Grad-CAM heat maps are the plain model's)."""

    def __init__(self, model_path: str | Path, device: str = "auto", legacy: bool | None = None,
                 precision: str = "fp32", unknown: bool = True, recheck_near_ties: bool = True,
                 tta: bool = False):
        self.model, meta = load_model(model_path, legacy=legacy)
        super().__init__(meta, unknown)
        self.device = resolve_device(device)
        self.arith = choose_arithmetic(precision, self.device)
        self.model.to(self.device).eval()  # as fp32 runs it (channels-last is for the bf16 copy)
        self.tta = tta
        if tta:
            from fruitnet.tta import TTA
        self.exact = TTA(self.model, flip=True, scales=()).eval() if tta else self.model  # fp32: the file as it is
        # bf16: BatchNorm folded into the convolutions (1.4x the photos a second); re-checks run `exact`
        self.net = self.exact
        if self.arith.dtype == "bf16":
            folded = self.arith.prepare_model(fold_batchnorm(self.model))
            if self.device.type == "cpu":  # and each ReLU6 applied as its convolution writes (oneDNN)
                folded, _ = fuse_conv_activations(folded)
            self.net = TTA(folded, flip=True, scales=()).eval() if tta else folded
        self.recheck_near_ties = recheck_near_ties  # bf16 only: see forward
        self._gradcam = None

    @torch.inference_mode()
    def forward(self, x: torch.Tensor):
        x = self.arith.prepare_input(x.to(self.device))
        with self.arith.autocast(self.device):
            logits, features = (t.float() for t in self.net.logits_and_features(x))
        if self.arith.dtype == "bf16" and self.recheck_near_ties:
            # bf16 rounding can flip a near-tie or a verdict near its threshold: those few photos
            # are run again in fp32, so labels and verdicts agree with fp32 and ONNX.
            top2 = logits.softmax(1).topk(min(2, logits.shape[1]), dim=1).values
            close = (top2[:, 0] - top2[:, -1]) < NEAR_TIE
            if self.model.trust is not None and self.threshold is not None:
                close |= self.model.trust.near_verdict(self.model.trust.score(logits, features), self.threshold)
            if close.any():
                exact = x[close].contiguous()  # the layout fp32 runs in: the very same arithmetic
                logits[close], features[close] = (t.float() for t in self.exact.logits_and_features(exact))
        if self.model.trust is None:
            return logits.cpu(), None, None
        score, in_dist = self.model.trust(logits, features)  # fp32, outside autocast
        return logits.cpu(), score.cpu(), in_dist.cpu()

    def heat_maps(self, x: torch.Tensor, targets: list[int]):
        from fruitnet.explain import GradCam

        if self._gradcam is None:
            self._gradcam = GradCam(self.model, self.preprocessing)
        return self._gradcam.heat(x, targets)

    def runtime(self) -> dict:
        near_ties = {"near_ties": f"run again in fp32 (top two within {NEAR_TIE})"} \
            if self.arith.dtype == "bf16" and self.recheck_near_ties else {}
        return {"runtime": "pytorch", "arithmetic": {**self.arith.as_dict(), **near_ties}, "tta": self.tta}


class OnnxPredictor(Predictor):
    """An exported .onnx file run by onnxruntime; metadata and preprocessing read from the file.

    A file exported with `fruitnet export --tta` averages each photo with its mirror inside the
    graph (its metadata says "tta": true), whether or not tta is asked for here; asking tta=True of
    a file exported without it is a UsageError (the graph cannot be changed here: re-export it).
    """

    explain_unavailable = ("heat maps need the PyTorch model file (.safetensors): Grad-CAM needs gradients, "
                           "which an exported ONNX file does not give")

    def __init__(self, onnx_path: str | Path, threads: int = 0, unknown: bool = True, tta: bool = False):
        import onnxruntime as ort

        path = Path(onnx_path)
        if not path.is_file():
            raise ModelFileError(f"{path}: ONNX file not found")
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads  # 0: onnxruntime's default (all cores)
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")  # leave idle cores to decoding
        opts.log_severity_level = 4  # fatal only: a failure reaches the user as fruitnet's one line, not as ORT's log
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
        self.tta = meta.get("tta") is True  # the averaging is in the graph (exported with --tta)
        if tta and not self.tta:
            source = meta.get("exported_from") or "MODEL.safetensors"
            raise UsageError(f"--tta: {path} was exported without test-time augmentation, and an ONNX file's "
                             f"graph cannot be changed when it runs; re-export it with: "
                             f"fruitnet export --tta {source} (or run the .safetensors model file with --tta)")
        super().__init__(meta, unknown)
        self.input_name = self.session.get_inputs()[0].name
        names = {o.name for o in self.session.get_outputs()}
        # files exported before calibration have only "logits"
        self.output_names = ["logits"] + (["score", "in_distribution"] if {"score", "in_distribution"} <= names else [])
        self.check_runs(path)  # the graph is code from the file: run it once before trusting it

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
        return {"runtime": "onnxruntime", "arithmetic": "fp32 (onnxruntime, CPU)", "tta": self.tta}


def load_predictor(path: str | Path, options: InferenceOptions = InferenceOptions()) -> Predictor:
    """The predictor for a model file, run as `options` say (config.InferenceOptions): runtime
    'torch', 'onnx', or 'auto' (onnx for a .onnx file); precision and device apply to torch;
    unknown=False never answers "unknown" (the in_distribution share is still given); tta=True
    averages each photo with its mirror image (an ONNX file must have been exported with --tta).
    Either runs once before it is returned (check_runs): a model that fails or overflows is
    refused at load, not at every photo."""
    if options.runtime == "onnx" or (options.runtime == "auto" and str(path).lower().endswith(".onnx")):
        return OnnxPredictor(path, unknown=options.unknown, tta=options.tta)  # it runs once as it loads
    predictor = TorchPredictor(path, device=options.device, legacy=options.legacy or None,
                               precision=options.precision, unknown=options.unknown, tta=options.tta)
    predictor.check_runs(path)
    return predictor
