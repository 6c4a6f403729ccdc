"""Classifier = backbone body + new linear head; the freeze policy; the model file.

The model file is a safetensors file: tensors plus a JSON metadata block (classes, backbone,
preprocessing, training summary).  Loading it never runs code from the file, and its metadata
is checked against a schema (ModelMeta) and the head's shape before any tensor is read.  The original
project's `model.pth` (a plain torchvision resnet18 state dict) is read through
`torch.load(weights_only=True)`, which refuses anything but tensors and plain containers.
"""

from __future__ import annotations

import json
import pickle
import warnings
from pathlib import Path
from typing import Annotated, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from fruitnet.backbones import BACKBONES, create_body, get_backbone, split_body
from fruitnet.dataset import UNKNOWN  # the answer for a photo of none of the classes: never a class name
from fruitnet.errors import ModelFileError
from fruitnet.modelpath import check_model_argument
from fruitnet.unknown import MAX_BANK, SCORES, TRUST_PREFIX, UnknownVerdict

FORMAT_VERSION = 1
DAMAGED = "damaged or incomplete model file (its header or tensors cannot be read); copy it again from the run folder"
MAX_CLASSES = 10_000
# The original project: resnet18, 3 classes, 300x300 squashed, mean/std 0.5 per channel.
LEGACY_CLASSES = ["cherry", "strawberry", "tomato"]
LEGACY_PREPROCESSING = {"input_size": 300, "resize": "squash", "crop_pct": 1.0,
                        "interpolation": "bilinear", "mean": [0.5] * 3, "std": [0.5] * 3}


# --- the metadata schema: checked whenever a model file (or an exported ONNX file) is opened ------

_Unit = Annotated[float, Field(ge=0, le=1)]  # mean: a colour value, images are scaled to 0..1
_Spread = Annotated[float, Field(gt=0, le=1)]  # std: divided by, so never 0
_ClassName = Annotated[str, Field(min_length=1, max_length=255)]


class Preprocessing(BaseModel):
    """What transforms.eval_transform needs; ranges wide enough for any real backbone."""

    model_config = ConfigDict(strict=True, extra="allow")
    input_size: int = Field(ge=32, le=1024)
    resize: Literal["crop", "squash"]
    crop_pct: float = Field(default=1.0, ge=0.25, le=1.0)
    interpolation: Literal["bilinear", "bicubic", "nearest"]
    mean: list[_Unit] = Field(min_length=3, max_length=3)
    std: list[_Spread] = Field(min_length=3, max_length=3)
    jpeg_draft: bool = False


class Trust(BaseModel):
    """Calibration and the unknown verdict (unknown.fit_trust); files made before them have none."""

    model_config = ConfigDict(strict=True, extra="allow")
    temperature: float = Field(gt=0, le=1000)
    threshold: float = Field(ge=0, le=1)
    score: Literal[SCORES] = "energy"  # files from before the kNN score all used energy
    recall: float | None = Field(default=None, gt=0, lt=1)
    negatives: dict | None = None  # {n, rejected}: photos of none of the classes it was fitted against


class Training(BaseModel):
    """The last epoch's numbers (serve shows the validation accuracy); other keys pass through."""

    model_config = ConfigDict(strict=True, extra="allow")
    val_accuracy: _Unit | None = None
    best_val_accuracy: _Unit | None = None


class ModelMeta(BaseModel):
    """The metadata every fruitnet model file carries.  Every key that fruitnet reads is typed here,
    so a wrong type is refused at load, not met as a traceback later; other keys pass through."""

    model_config = ConfigDict(strict=True, extra="allow")
    format: Literal["fruitnet"]
    format_version: int = Field(ge=1, le=FORMAT_VERSION)
    classes: list[_ClassName] = Field(min_length=2, max_length=MAX_CLASSES)
    backbone: str
    preprocessing: Preprocessing
    trust: Trust | None = None
    training: Training | None = None
    training_photos: list[Annotated[str, Field(max_length=64)]] | None = None  # fingerprints (evaluate warns)
    tta: bool = False  # an ONNX file exported with --tta
    exported_from: str | None = None
    source: str | None = None

    @field_validator("classes")
    @classmethod
    def _unique(cls, classes: list[str]) -> list[str]:
        if UNKNOWN in classes:  # training refuses such a folder; an edited file must not bring it back
            raise ValueError(f"a class named {UNKNOWN!r} would be confused with the answer for photos of none "
                             "of the classes")
        seen, twice = set(), []
        for c in classes:
            if c in seen and c not in twice:
                twice.append(c)
            seen.add(c)
        if twice:
            raise ValueError(f"class names must be unique; repeated: {', '.join(map(repr, twice[:5]))}")
        return classes

    @field_validator("backbone")
    @classmethod
    def _known(cls, name: str) -> str:
        if name not in BACKBONES:
            raise ValueError(f"unknown backbone {name[:60]!r}; known: {', '.join(BACKBONES)}")
        return name


def validate_meta(meta, path) -> dict:
    """``meta`` if it satisfies ModelMeta, else ModelFileError naming the file and the first problems."""
    if not isinstance(meta, dict):
        raise ModelFileError(f"{path}: model metadata is not a JSON object")
    try:
        ModelMeta.model_validate(meta)
    except ValidationError as exc:
        problems = [_describe(e) for e in exc.errors()[:3]]
        more = f" (and {exc.error_count() - 3} more)" if exc.error_count() > 3 else ""
        raise ModelFileError(f"{path}: bad model metadata: {'; '.join(problems)}{more}") from None
    return meta


def _describe(error: dict) -> str:
    where = ".".join(str(part) for part in error["loc"]) or "metadata"
    if error["type"] == "missing":
        return f"{where}: missing"
    message = error["msg"].removeprefix("Value error, ")
    if error["type"] in ("value_error", "too_long", "too_short"):  # the message says it all; the input may be huge
        return f"{where}: {message.split(' after validation')[0]}"
    return f"{where}: {message} (got {repr(error.get('input'))[:40]})"


class Classifier(nn.Module):
    def __init__(self, body: nn.Module, feature_dim: int, num_classes: int):
        super().__init__()
        self.body = body
        self.head = nn.Linear(feature_dim, num_classes)
        self.trust: UnknownVerdict | None = None  # set at the end of training (unknown.fit_trust); old files have none

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))

    def logits_and_features(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The logits and the body's pooled features (what the in-distribution score may need)."""
        features = self.body(x)
        return self.head(features), features

    def set_mode(self, mode: str, unfreeze_last: int = 0) -> None:
        """'freeze': only the head learns; 'unfreeze': every layer learns; 'partial': the head and the
        body's last `unfreeze_last` stages (backbones.split_body's tail) learn."""
        if mode not in ("freeze", "unfreeze", "partial"):
            raise ValueError(f"mode must be 'freeze', 'unfreeze' or 'partial', not {mode!r}")
        self.frozen = mode == "freeze"
        for p in self.body.parameters():
            p.requires_grad = mode == "unfreeze"
        if mode == "partial":
            for p in split_body(self.body, unfreeze_last)[1].parameters():
                p.requires_grad = True

    def train(self, mode: bool = True):
        super().train(mode)
        if getattr(self, "frozen", False):
            self.body.eval()  # frozen: BatchNorm running statistics stay as pretrained
        return self

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]


def fold_batchnorm(net: nn.Module) -> nn.Module:
    """A copy of an eval-mode network with each BatchNorm folded into the convolution just before
    it (timm's BatchNormAct2d keeps its activation): the same function up to float rounding, with
    one pass over every activation map less per layer (predict's profile: a quarter of the body's
    time in bf16).  Pairs are consecutive children, as in the backbones here (tested per backbone)."""
    import copy

    from torch.nn.utils.fusion import fuse_conv_bn_weights

    net = copy.deepcopy(net).eval()
    for module in list(net.modules()):
        children = list(module.named_children())
        for (_, conv), (name, bn) in zip(children, children[1:]):
            if isinstance(conv, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d) and bn.running_var is not None:
                conv.weight, conv.bias = fuse_conv_bn_weights(conv.weight, conv.bias, bn.running_mean, bn.running_var,
                                                              bn.eps, bn.weight, bn.bias)
                setattr(module, name, nn.Sequential(bn.drop, bn.act) if hasattr(bn, "act") else nn.Identity())
    return net


class ConvAct(nn.Module):
    """A convolution and the activation after it as one oneDNN call (CPU inference): the
    activation is applied as the convolution writes its output, instead of in a second pass over
    the map (predict's bf16 profile: a fifth of the body's time).  Exactly the same numbers: the
    clamp commutes with the rounding to bf16."""

    ACTIVATIONS = {nn.ReLU6: ("hardtanh", [0.0, 6.0]), nn.ReLU: ("relu", [])}

    def __init__(self, conv: nn.Conv2d, act: nn.Module, dtype: torch.dtype):
        super().__init__()
        from timm.layers import Conv2dSame
        from timm.layers.padding import pad_same

        self.register_buffer("weight", conv.weight.detach().to(dtype).contiguous(memory_format=torch.channels_last))
        self.register_buffer("bias", None if conv.bias is None else conv.bias.detach().to(dtype))
        self.args = (list(conv.padding), list(conv.stride), list(conv.dilation), conv.groups)
        # TensorFlow's "same" padding (timm's Conv2dSame) is asymmetric: padded here, as timm does
        k, stride, dilation = conv.kernel_size, conv.stride, conv.dilation
        self.pad = (lambda x: pad_same(x, k, stride, dilation)) if isinstance(conv, Conv2dSame) else None
        self.attr, self.scalars = self.ACTIVATIONS[type(act)]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.pad is not None:
            x = self.pad(x)
        return torch.ops.mkldnn._convolution_pointwise(x.to(self.weight.dtype), self.weight, self.bias, *self.args,
                                                       self.attr, self.scalars, "")


def fuse_conv_activations(net: nn.Module, dtype: torch.dtype = torch.bfloat16) -> tuple[nn.Module, int]:
    """`net` (folded by fold_batchnorm) changed in place: each convolution whose folded BatchNorm
    kept a ReLU or ReLU6 becomes a ConvAct.  For CPU inference in `dtype` only (oneDNN's kernels,
    no gradients).  Returns (net, how many were fused); nothing is fused where oneDNN is missing."""
    from timm.layers import Conv2dSame

    fused = 0
    if not torch.backends.mkldnn.is_available():
        return net, fused
    for module in list(net.modules()):
        children = list(module.named_children())
        for (conv_name, conv), (name, after) in zip(children, children[1:]):
            parts = list(after.children()) if isinstance(after, nn.Sequential) else []
            if (type(conv) in (nn.Conv2d, Conv2dSame) and len(parts) == 2 and isinstance(parts[0], nn.Identity)
                    and type(parts[1]) in ConvAct.ACTIVATIONS):  # fold_batchnorm's (drop, act)
                setattr(module, conv_name, ConvAct(conv, parts[1], dtype))
                setattr(module, name, nn.Identity())
                fused += 1
    return net, fused


def create_classifier(backbone: str, num_classes: int, weights: str = "imagenet") -> tuple[Classifier, str]:
    """Returns (classifier, description of the weight source)."""
    body, source = create_body(backbone, weights)
    return Classifier(body, get_backbone(backbone).feature_dim, num_classes), source


def save_model(path: str | Path, model: Classifier, meta: dict) -> Path:
    """Write weights and metadata to one safetensors file (written to a temp name, then renamed)."""
    path = Path(path)
    meta = validate_meta({"format": "fruitnet", "format_version": FORMAT_VERSION, **meta}, path)  # never write what load refuses
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    tmp = path.with_name(path.name + ".tmp")
    save_file(state, str(tmp), metadata={"fruitnet": json.dumps(meta)})
    tmp.replace(path)
    return path


def _is_safetensors(path: Path) -> bool:
    with open(path, "rb") as f:
        head = f.read(9)
    # 8-byte little-endian header length, then the JSON header starting with '{'
    return len(head) == 9 and head[8:9] == b"{"


def load_model(path: str | Path, legacy: bool | None = None) -> tuple[Classifier, dict]:
    """Load a fruitnet model file, or (detected, or legacy=True) the original project's model.pth."""
    path = Path(path)
    check_model_argument(path)  # a run folder, a checkpoint, a photo: say what to pass instead
    if not path.is_file():
        raise ModelFileError(f"{path}: model file not found")
    if legacy is None:
        legacy = not _is_safetensors(path)
    if legacy:
        return _load_legacy(path)
    try:
        with safe_open(str(path), framework="pt") as f:  # reads the header only
            meta = json.loads((f.metadata() or {}).get("fruitnet", "null"))
            head = f.get_slice("head.weight").get_shape() if "head.weight" in f.keys() else None
    except (SafetensorError, OSError, ValueError, RecursionError):  # JSONDecodeError is a ValueError
        raise ModelFileError(f"{path}: {DAMAGED}") from None
    if not isinstance(meta, dict) or meta.get("format") != "fruitnet":
        raise ModelFileError(f"{path}: safetensors file without fruitnet metadata")
    validate_meta(meta, path)  # before anything is allocated from what the metadata says
    expected = [len(meta["classes"]), get_backbone(meta["backbone"]).feature_dim]
    if head != expected:
        raise ModelFileError(f"{path}: the head's weights have shape {head}, but {len(meta['classes'])} classes "
                             f"on {meta['backbone']} need {expected}")
    try:
        state = load_file(str(path))
    except (SafetensorError, OSError):
        raise ModelFileError(f"{path}: {DAMAGED}") from None
    model, _ = create_classifier(meta["backbone"], len(meta["classes"]), weights="none")
    trust = {k[len(TRUST_PREFIX):]: state[k] for k in state if k.startswith(TRUST_PREFIX)}
    if trust:  # the in-distribution statistics (unknown.UnknownVerdict), shaped by the file's own tensors
        _check_trust(path, trust, meta, feature_dim=expected[1])
        model.trust = UnknownVerdict(**trust)
    _check_values(path, state, model.state_dict())
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        raise ModelFileError(f"{path}: weights do not fit backbone {meta['backbone']}: {exc}") from exc
    return model.eval(), meta


def _check_trust(path: Path, trust: dict[str, torch.Tensor], meta: dict, feature_dim: int) -> None:
    """The statistics the metadata's score needs, the kNN bank with the body's feature width."""
    score = (meta.get("trust") or {}).get("score", "energy")
    names = {"val_scores", "bank"} if score == "knn" else {"val_scores"}
    bank = trust.get("bank")
    if "trust" not in meta or set(trust) != names or trust["val_scores"].dim() != 1 or (bank is not None and (
            bank.dim() != 2 or bank.shape[1] != feature_dim or not 1 <= bank.shape[0] <= MAX_BANK)):
        raise ModelFileError(f"{path}: unexpected in-distribution statistics for the {score} score "
                             f"({', '.join(f'{k} {list(v.shape)}' for k, v in sorted(trust.items()))})")


def _check_values(path: Path, state: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    """Each tensor of the dtype the model holds, not empty, and finite: load_state_dict would cast
    an int64 tensor silently, and one NaN makes every answer NaN (or every photo "unknown")."""
    for name, tensor in state.items():
        if not isinstance(tensor, torch.Tensor):
            raise ModelFileError(f"{path}: {name} is not a tensor")
        want = expected[name].dtype if name in expected else tensor.dtype  # a stray key: load_state_dict says
        if tensor.dtype != want:
            problem = f"is {tensor.dtype}, not {want}"
        elif tensor.numel() == 0:
            problem = "is empty"
        elif tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            problem = "holds NaN or infinite values"
        else:
            continue
        raise ModelFileError(f"{path}: tensor {name} {problem}; the model cannot give meaningful answers "
                             "(copy the file again from its run folder, or train again)")


def _looks_like_text(path: Path) -> bool:
    with open(path, "rb") as f:
        head = f.read(4096)
    try:
        return all(c.isprintable() or c.isspace() for c in head.decode("utf-8"))
    except UnicodeDecodeError:
        return False


def _is_torch_file(path: Path) -> bool:
    """What torch.save writes: a zip archive, or (before PyTorch 1.6) a pickle."""
    with open(path, "rb") as f:
        head = f.read(4)
    return head.startswith(b"PK\x03\x04") or head[:1] == b"\x80"


def _load_legacy(path: Path) -> tuple[Classifier, dict]:
    neither = f"{path}: neither a fruitnet model file (.safetensors) nor the original project's model.pth"
    if not _is_torch_file(path):
        raise ModelFileError(f"{neither}{' (it is a text file)' if _looks_like_text(path) else ''}; pass a run's "
                             "best.safetensors, an exported .onnx file or the original model.pth")
    try:
        with warnings.catch_warnings():  # torch warns about pickle protocols it then reads fine
            warnings.simplefilter("ignore")
            state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        if "weights only load failed" in str(exc).lower():
            raise ModelFileError(f"{path}: holds Python objects, not only tensors; fruitnet never loads those "
                                 "(loading them could run code)") from None
        raise ModelFileError(neither) from None
    except Exception:  # torch.load raises many types for files that are not a state dict at all
        raise ModelFileError(neither) from None
    if isinstance(state, dict) and {"model", "optimizer", "epoch"} <= set(state):
        raise ModelFileError(f"{path}: a training checkpoint (for fruitnet train --resume), not a model file; "
                             "pass the run's best.safetensors")
    fc = state.get("fc.weight") if isinstance(state, dict) else None
    if not isinstance(fc, torch.Tensor) or fc.dim() != 2:
        raise ModelFileError(f"{path}: not a torchvision resnet18 state dict (no 2-d 'fc.weight')")
    n = fc.shape[0]
    classes = LEGACY_CLASSES if n == len(LEGACY_CLASSES) else [f"class_{i}" for i in range(n)]
    meta = validate_meta({"format": "fruitnet", "format_version": FORMAT_VERSION, "classes": classes,
                          "backbone": "resnet18", "preprocessing": dict(LEGACY_PREPROCESSING),
                          "source": f"legacy model.pth ({path.name})"}, path)
    renamed = {("head." + k[3:] if k.startswith("fc.") else "body." + k): v for k, v in state.items()}
    model, _ = create_classifier("resnet18", n, weights="none")
    _check_values(path, renamed, model.state_dict())
    try:
        model.load_state_dict(renamed)
    except RuntimeError as exc:
        raise ModelFileError(f"{path}: not a torchvision resnet18 state dict: {exc}") from exc
    return model.eval(), meta
