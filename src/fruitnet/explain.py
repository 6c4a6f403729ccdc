"""Where the network looked: Grad-CAM heat maps over the photo (captum's LayerGradCam).

captum (PyTorch's own interpretability library) computes the Grad-CAM; this module only chooses
the layer, turns the map into a picture and lays it beside the photo. The layer is the body's last
child module whose output still has a spatial grid (EfficientNet's bn2, ResNet's layer4): found
by running the body once, so new backbones need no entry here.

Heat maps need gradients, so they come from the PyTorch model file only; an exported ONNX file
cannot give them (`ExplainUnavailable`).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont
from torch import nn

from fruitnet.errors import FruitnetError
from fruitnet.progress import bar as progress_bar
from fruitnet.transforms import resize_size

OVERLAY_ALPHA = 0.5
CAPTION_PX = 28


class ExplainUnavailable(FruitnetError, ValueError):
    """Heat maps were asked of a model that cannot give them (an ONNX file)."""


def target_layer(body: nn.Module, input_size: int) -> nn.Module:
    """The last direct child of the body whose output is a feature map larger than 1x1."""
    outputs: dict[str, torch.Tensor] = {}
    hooks = [child.register_forward_hook(lambda m, i, o, name=name: outputs.__setitem__(name, o))
             for name, child in body.named_children()]
    try:
        with torch.no_grad():
            body.eval()(torch.zeros(1, 3, input_size, input_size))
    finally:
        for h in hooks:
            h.remove()
    spatial = [name for name, out in outputs.items()
               if isinstance(out, torch.Tensor) and out.dim() == 4 and min(out.shape[2:]) > 1]
    if not spatial:
        raise ExplainUnavailable("this backbone has no convolutional feature map to explain")
    return dict(body.named_children())[spatial[-1]]


class GradCam:
    """Heat maps for one classifier (a fruitnet Classifier, run in fp32 on the CPU or its device)."""

    def __init__(self, model: nn.Module, preprocessing: dict):
        from captum.attr import LayerGradCam

        self.model, self.pre = model, preprocessing
        self.device = next(model.parameters()).device
        self.layer = target_layer(model.body, preprocessing["input_size"])
        self.cam = LayerGradCam(model, self.layer)

    def heat(self, x: torch.Tensor, target: list[int] | torch.Tensor) -> np.ndarray:
        """Normalised input batch -> (n, H, W) heat maps in [0, 1] at input resolution, for the target classes."""
        from captum.attr import LayerAttribution

        self.model.eval()
        x = x.to(self.device).float().requires_grad_(True)
        with torch.enable_grad(), torch.autocast(self.device.type, enabled=False):
            maps = self.cam.attribute(x, target=torch.as_tensor(target, device=self.device),
                                      relu_attributions=True)
        maps = LayerAttribution.interpolate(maps.detach().float(), tuple(x.shape[2:]), "bilinear")[:, 0]
        peak = maps.flatten(1).amax(1).clamp_min(1e-12)[:, None, None]
        return (maps / peak).clamp(0, 1).cpu().numpy()


def model_view(image: Image.Image, pre: dict) -> Image.Image:
    """The part of the photo the model sees, at its input size (the evaluation transform's geometry)."""
    size = pre["input_size"]
    if pre["resize"] == "squash":
        return image.convert("RGB").resize((size, size), Image.Resampling.BICUBIC)
    side = resize_size(pre)
    w, h = image.size
    scale = side / min(w, h)
    resized = image.convert("RGB").resize((max(side, round(w * scale)), max(side, round(h * scale))),
                                          Image.Resampling.BICUBIC)
    left, top = (resized.width - size) // 2, (resized.height - size) // 2
    return resized.crop((left, top, left + size, top + size))


def overlay(view: Image.Image, heat: np.ndarray, alpha: float = OVERLAY_ALPHA) -> Image.Image:
    """The model's view with the heat map blended over it (matplotlib's 'jet': blue cold, red hot)."""
    from matplotlib import colormaps

    colours = (colormaps["jet"](heat)[..., :3] * 255).astype(np.uint8)
    heat_img = Image.fromarray(colours).resize(view.size, Image.Resampling.BILINEAR)
    return Image.blend(view.convert("RGB"), heat_img, alpha)


def _font(size: int):
    try:
        return ImageFont.load_default(size)
    except TypeError:  # Pillow < 10.1: one fixed size
        return ImageFont.load_default()


def side_by_side(view: Image.Image, heat_view: Image.Image, caption: str) -> Image.Image:
    """Photo (as the model saw it) | heat map over it, with the caption (label, confidence) beneath."""
    w, h = view.size
    canvas = Image.new("RGB", (2 * w, h + CAPTION_PX), "white")
    canvas.paste(view, (0, 0))
    canvas.paste(heat_view, (w, 0))
    ImageDraw.Draw(canvas).text((6, h + 4), caption, fill="black", font=_font(CAPTION_PX - 10))
    return canvas


def caption(result: dict) -> str:
    """'tomato 97.1%', or 'none of these (closest: tomato 61.0%)' for an unknown verdict."""
    best = result.get("best_guess", result["label"])
    conf = f"{best} {result['probabilities'][best]:.1%}"
    return conf if result["label"] != "unknown" else f"none of these (closest: {conf})"


def explain_images(predictor, images: list[Image.Image], results: list[dict]) -> list[Image.Image]:
    """Photo | heat map side by side, captioned, for each image and its prediction (the heat map
    of the best class, also for an unknown verdict)."""
    index = {c: i for i, c in enumerate(predictor.classes)}
    x = torch.stack([predictor.transform(im) for im in images])
    heats = predictor.heat_maps(x, [index[r.get("best_guess", r["label"])] for r in results])
    views = [model_view(im, predictor.preprocessing) for im in images]
    return [side_by_side(v, overlay(v, h), caption(r)) for v, h, r in zip(views, heats, results)]


def write_overlays(predictor, results: list[dict], out: Path, batch_size: int = 8,
                   progress: bool = True) -> dict[str, Image.Image]:
    """One PNG per predicted photo in out/ (NAME.png; NAME-2.png where names repeat); returns {path: overlay}."""
    from fruitnet.images import load_image

    out.mkdir(parents=True, exist_ok=True)
    written, used = {}, set()
    with progress_bar(total=len(results), desc="heat maps", unit="img",
                      disable=not progress or len(results) < 2) as bar:
        for i in range(0, len(results), batch_size):
            chunk = results[i:i + batch_size]
            for r, picture in zip(chunk, explain_images(predictor, [load_image(r["path"]) for r in chunk], chunk)):
                stem, n = Path(r["path"]).stem, 1
                while (name := f"{stem}{'' if n == 1 else f'-{n}'}.png") in used:
                    n += 1
                used.add(name)
                picture.save(out / name)
                written[r["path"]] = picture
            bar.update(len(chunk))
    return written
