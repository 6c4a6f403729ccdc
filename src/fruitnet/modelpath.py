"""What a MODEL argument points at, told before anything heavy is loaded (no torch here).

Users pass a run folder, a photo folder (arguments swapped), a photo or a training checkpoint
where a model file belongs; each gets one line saying what was given and what to pass instead
(exit code 2), rather than "model file not found" or an unpickling error.
"""

from __future__ import annotations

import json
from pathlib import Path

from fruitnet.errors import UsageError
from fruitnet.images import sniff_format

MODEL_SUFFIXES = (".safetensors", ".onnx", ".pth", ".pt")
MODEL_FILES = ("best.safetensors", "last.safetensors")
CHECKPOINT = "checkpoint.pt"  # the run folder's optimiser state, for --resume


def _looks_like_model(path: Path) -> bool:
    return path.is_file() and path.suffix.lower() in MODEL_SUFFIXES


def check_model_argument(model, others=(), command: str = "predict") -> None:
    """Raise UsageError when `model` is not a model file but something a user passes by mistake.

    `others` are the command's other path arguments (DATA, PATH...): a model file among them
    means the arguments were swapped.  A path that does not exist is left to the loader."""
    path = Path(model)
    swapped = next((Path(o) for o in others if _looks_like_model(Path(o))), None)
    if path.is_dir():
        found = next((path / name for name in MODEL_FILES if (path / name).is_file()), None)
        if found is not None:
            raise UsageError(f"{path} is a run folder; pass {found}")
        if (path / "config.json").is_file():
            raise UsageError(f"{path} is a run folder without a model file yet (no epoch finished); "
                             f"continue it with: fruitnet train --resume {path}")
        if swapped is not None:
            raise UsageError(f"{path} is a folder and {swapped} a model file: the model comes first: "
                             f"fruitnet {command} {swapped} {path}")
        raise UsageError(f"{path} is a folder, not a model file; pass a model file such as "
                         "runs/<run>/best.safetensors")
    if path.name == CHECKPOINT:
        best = path.with_name("best.safetensors")
        instead = f"pass {best}" if best.is_file() else "pass the run's best.safetensors"
        raise UsageError(f"{path} is a training checkpoint (for fruitnet train --resume), not a model file; {instead}")
    if path.is_file() and sniff_format(path) is not None:
        then = f"; the model comes first: fruitnet {command} {swapped} {path}" if swapped is not None else \
            "; pass a model file such as runs/<run>/best.safetensors"
        raise UsageError(f"{path} is an image, not a model file{then}")


MAX_HEADER = 100 << 20  # a safetensors header is JSON of a few hundred kB at most


def peek_metadata(path) -> dict | None:
    """The fruitnet metadata of a .safetensors model file, read from its header without torch;
    None when the file is anything else (the loader then says what is wrong with it)."""
    try:
        with open(path, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            if not 2 <= n <= MAX_HEADER:
                return None
            header = json.loads(f.read(n))
        meta = json.loads(header["__metadata__"]["fruitnet"])
    except (OSError, ValueError, KeyError, TypeError, RecursionError):
        return None
    return meta if isinstance(meta, dict) else None
