"""ONNX export with a parity check (and an optional int8 copy).

The exported file carries the model file's metadata (classes, backbone, preprocessing, training,
trust) as JSON under the ONNX metadata_props key "fruitnet"; predictors.OnnxPredictor builds its
transform from it with the same transforms.eval_transform as the PyTorch path, so nothing is
re-typed.

The graph itself gives a user of the bare .onnx file everything predict gives (`Exported`):
outputs `logits`, `probabilities` (calibrated: the temperature is a constant in the graph) and,
for model files with in-distribution statistics, `score`, `in_distribution` (the share of
validation photos scoring no higher) and `known` (in_distribution >= the stored threshold).

With tta=True (`fruitnet export --tta`) the graph is tta.TTA(model): each photo's logits are the
average of the photo's and its mirror image's, inside the file (twice the compute), and the
metadata says "tta": true; the parity check compares it with the PyTorch predictor run with tta.
"""

from __future__ import annotations

import json
import logging
import os
import time
import warnings
from importlib import resources
from pathlib import Path

import numpy as np
import torch
from torch import nn

from fruitnet.config import InferenceOptions
from fruitnet.errors import DataError, ExportError
from fruitnet.outputs import check_outputs
from fruitnet.predictors import ONNX_META_KEY, OnnxPredictor, Predictor, TorchPredictor, expand_paths

OPSET = 17
MAX_PROB_DIFF = 1e-3  # parity: largest |p_onnx - p_torch| allowed, with 100% top-1 agreement
CHECK_BATCH = 16


# --- export ---------------------------------------------------------------------------------

class Exported(nn.Module):
    """The classifier as exported: logits, calibrated probabilities and the unknown verdict's inputs."""

    def __init__(self, model: nn.Module, meta: dict):
        super().__init__()
        trust = meta.get("trust") or {}
        self.model = model
        self.temperature = float(trust.get("temperature", 1.0))
        self.threshold = float(trust.get("threshold", 0.0))

    def output_names(self) -> list[str]:
        return ["logits", "probabilities"] + (["score", "in_distribution", "known"] if self.model.trust else [])

    def forward(self, x: torch.Tensor):
        logits, features = self.model.logits_and_features(x)
        outputs = (logits, (logits / self.temperature).softmax(1))
        if self.model.trust is None:
            return outputs
        score, in_dist = self.model.trust(logits, features)
        return outputs + (score, in_dist, in_dist >= self.threshold)


def write_onnx(model: torch.nn.Module, meta: dict, out: Path) -> Path:
    """Trace the classifier to ONNX (dynamic batch axis) and store meta in metadata_props."""
    import onnx

    size = meta["preprocessing"]["input_size"]
    graph = Exported(model.eval().cpu(), meta).eval()
    names = graph.output_names()
    with warnings.catch_warnings():
        # The TorchScript exporter (dynamo=False): one self-contained file in under a second for
        # these plain CNNs; the dynamo exporter takes ~20x longer and needs onnxscript.
        warnings.simplefilter("ignore")
        torch.onnx.export(graph, (torch.zeros(2, 3, size, size),), str(out), dynamo=False, opset_version=OPSET,
                          input_names=["input"], output_names=names,
                          dynamic_axes={"input": {0: "batch"}, **{n: {0: "batch"} for n in names}})
    proto = onnx.load(str(out))
    onnx.helper.set_model_props(proto, {ONNX_META_KEY: json.dumps(meta)})
    proto.doc_string = f"fruitnet {meta['backbone']} classifier: {', '.join(meta['classes'])}"
    onnx.checker.check_model(proto)
    onnx.save(proto, str(out))
    return out


def check_images(check: list[str] | None, limit: int = 64) -> tuple[list, str]:
    """Images for the parity check: (PIL images, description).

    From --check paths if given (evenly sampled down to `limit`), else the bundled demo photos,
    else generated images (a weaker check, and said so).
    """
    from fruitnet.errors import ImageError
    from fruitnet.images import load_image

    given = bool(check)
    if not given:
        demo = resources.files("fruitnet") / "demo_data"
        check = [str(demo)] if demo.is_dir() else []
    paths, _ = expand_paths(check) if check else ([], [])
    if len(paths) > limit:
        paths = [paths[round(i * (len(paths) - 1) / (limit - 1))] for i in range(limit)]
    images = []
    for p in paths:
        try:
            images.append(load_image(p))
        except (ImageError, OSError):
            pass
    if images:
        return images, f"{len(images)} photos from {', '.join(check)}"
    if given:
        raise DataError(f"no usable photos for the parity check in {', '.join(check)}")
    rng = np.random.default_rng(0)
    gen = [np.kron(rng.integers(0, 256, (8, 8, 3)), np.ones((40, 40, 1))).astype(np.uint8) for _ in range(16)]
    from PIL import Image

    return [Image.fromarray(a, "RGB") for a in gen], "16 generated images (no photos given: pass --check DIR)"


def _outputs(predictor: Predictor, images: list) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(calibrated probabilities, in_distribution or None), in batches (exercises the batch axis)."""
    parts = [predictor.outputs(torch.stack([predictor.transform(im) for im in images[i:i + CHECK_BATCH]]))
             for i in range(0, len(images), CHECK_BATCH)]
    probs = torch.cat([p for p, _ in parts])
    return probs, None if parts[0][1] is None else torch.cat([d for _, d in parts])


def compare(reference: Predictor, candidate: Predictor, images: list) -> dict:
    """Top-1 agreement, largest probability difference and, with in-distribution statistics,
    agreement of the unknown verdicts and the largest in_distribution difference."""
    ref, ref_in = _outputs(reference, images)
    got, got_in = _outputs(candidate, images)
    agree = int((ref.argmax(1) == got.argmax(1)).sum())
    result = {"n": len(images), "agree": agree, "top1_agreement": agree / len(images),
              "max_prob_diff": float((ref - got).abs().max())}
    if ref_in is not None and got_in is not None and reference.threshold is not None:
        same = int(((ref_in >= reference.threshold) == (got_in >= candidate.threshold)).sum())
        result.update(verdicts_agree=same, max_in_distribution_diff=float((ref_in - got_in).abs().max()))
    return result


def parity_ok(parity: dict) -> bool:
    return (parity["agree"] == parity["n"] and parity["max_prob_diff"] <= MAX_PROB_DIFF
            and parity.get("verdicts_agree", parity["n"]) == parity["n"])


def ms_per_image(predictor: Predictor, images: list, batch_size: int = 1, rounds: int = 3) -> float:
    """Forward-pass time per image on (up to 16 of) images, preprocessing excluded (it is the same
    for every runtime): the median over rounds, after a warm-up."""
    x = torch.stack([predictor.transform(im) for im in images[:16]])
    predictor.logits(x[:batch_size])
    times = []
    for _ in range(rounds):
        t = time.perf_counter()
        for i in range(0, len(x), batch_size):
            predictor.logits(x[i:i + batch_size])
        times.append((time.perf_counter() - t) / len(x) * 1000)
    return float(np.median(times))


def quantize_int8(fp32: Path, out: Path, calibration: list, transform) -> Path:
    """Static int8 quantisation (QDQ, per-channel weights), activations calibrated on `calibration`."""
    import onnx
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.batches = iter([{"input": transform(im)[None].numpy()} for im in calibration])

        def get_next(self):
            return next(self.batches, None)

    pre = out.with_name(out.name + ".pre.onnx")
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)  # the quantiser logs every shape tensor it leaves alone
    try:
        quant_pre_process(str(fp32), str(pre))
        # the in-distribution score (distances, a comparison with the validation scores) stays fp32
        keep = [n.name for n in onnx.load(str(pre)).graph.node if "/trust/" in n.name]
        quantize_static(str(pre), str(out), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                        weight_type=QuantType.QInt8, activation_type=QuantType.QUInt8, nodes_to_exclude=keep)
    finally:
        root.setLevel(level)
        pre.unlink(missing_ok=True)
    return out


def export_onnx(model_path: str | Path, out: str | Path | None = None,
                options: InferenceOptions = InferenceOptions(), check: list[str] | None = None,
                int8: bool = False, log=print) -> dict:
    """Export MODEL to ONNX, verify it against PyTorch on real images, optionally add an int8 copy.

    options.tta exports the model wrapped in tta.TTA (mirror averaged in the graph), checked
    against the PyTorch predictor with tta, and records "tta": true in the file's metadata.

    The file appears at `out` only if it passed the parity check (100% top-1 agreement and largest
    probability difference <= MAX_PROB_DIFF); otherwise ExportError, and it is left at out + '.rejected'.
    Returns a summary dict (paths, parity, and for int8 its agreement and speed).
    """
    model_path = Path(model_path)
    out = Path(out) if out else model_path.with_suffix(".onnx")
    check_outputs({"--out": out, "--int8": out.with_suffix(".int8.onnx") if int8 else None}, inputs=check or (),
                  model=model_path)
    tta = options.tta
    reference = TorchPredictor(model_path, device="cpu", legacy=options.legacy or None, tta=tta)
    meta = {**reference.meta, "exported_from": model_path.name, **({"tta": True} if tta else {})}
    images, described = check_images(check)

    tmp = out.with_name(out.name + ".tmp")
    t = time.perf_counter()
    write_onnx(reference.net, meta, tmp)  # with tta: tta.TTA(model), the mirror averaged in the graph
    log(f"exported {model_path} -> {out} ({os.path.getsize(tmp) / 1e6:.1f} MB, opset {OPSET}, "
        f"dynamic batch{', test-time augmentation (mirror) in the graph' if tta else ''}) "
        f"in {time.perf_counter() - t:.1f}s")
    onnx_predictor = OnnxPredictor(tmp)  # reads classes and preprocessing back from the file itself
    parity = compare(reference, onnx_predictor, images)
    ok = parity_ok(parity)
    verdicts = (f", unknown verdicts agree {parity['verdicts_agree']}/{parity['n']}"
                if "verdicts_agree" in parity else "")
    log(f"parity on {described}: top-1 agreement {parity['top1_agreement']:.1%} ({parity['agree']}/{parity['n']}), "
        f"largest probability difference {parity['max_prob_diff']:.2e} (limit {MAX_PROB_DIFF:.0e}){verdicts} "
        f"-> {'OK' if ok else 'FAILED'}")
    if not ok:
        rejected = out.with_name(out.name + ".rejected")
        tmp.replace(rejected)
        raise ExportError(f"the ONNX model disagrees with the PyTorch model; kept for inspection at {rejected}")
    tmp.replace(out)
    summary = {"onnx": str(out), "check_set": described, "parity": parity, "tta": tta}
    if int8:
        summary["int8"] = _int8(out, reference, onnx_predictor, images, log)
    return summary


def _int8(fp32: Path, reference: Predictor, onnx_predictor: OnnxPredictor, images: list, log) -> dict:
    out = fp32.with_suffix(".int8.onnx")
    calibration, held_out = images[::2], images[1::2] or images
    t = time.perf_counter()
    quantize_int8(fp32, out, calibration, onnx_predictor.transform)
    q = OnnxPredictor(out)
    parity = compare(reference, q, held_out)
    speed = {name: ms_per_image(p, images) for name, p in
             (("pytorch", reference), ("onnx", onnx_predictor), ("onnx_int8", q))}
    log(f"int8: {out} ({os.path.getsize(out) / 1e6:.1f} MB) in {time.perf_counter() - t:.1f}s, calibrated on "
        f"{len(calibration)} check images; on the other {parity['n']}: top-1 agreement with PyTorch "
        f"{parity['top1_agreement']:.1%} ({parity['agree']}/{parity['n']}), largest probability difference "
        f"{parity['max_prob_diff']:.3f}"
        + (f", unknown verdicts agree {parity['verdicts_agree']}/{parity['n']}" if "verdicts_agree" in parity else ""))
    log("forward pass, batch 1, ms/image (median of 3 rounds): " +
        ", ".join(f"{k} {v:.1f}" for k, v in speed.items()) +
        f"; int8 is {speed['onnx'] / speed['onnx_int8']:.1f}x onnx fp32")
    return {"path": str(out), "parity": parity, "ms_per_image": speed}
