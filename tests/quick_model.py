"""The helpers that tests and benchmarks share (one copy, imported; bench/ puts tests/ on sys.path):

- make_quick_model: a real model file in about two seconds: an ImageNet EfficientNet-Lite body
  (Lite0 by default) + an untrained, seeded head, for tests and benchmarks of plumbing, parity and
  speed, not accuracy; with_metadata and bad_metadata_cases: model files with changed metadata;
- free_port and serving: `fruitnet serve MODEL` started as a user starts it, on a free loopback port.
"""

from __future__ import annotations

import re
import socket
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

CLASSES = ["cherry", "strawberry", "tomato"]


def make_quick_model(path: Path, training: dict | None = None, backbone: str = "efficientnet_lite0") -> Path:
    import torch

    from fruitnet.backbones import get_backbone
    from fruitnet.model import create_classifier, save_model

    torch.manual_seed(0)
    model, _ = create_classifier(backbone, len(CLASSES), "imagenet")
    meta = {"classes": CLASSES, "backbone": backbone, "preprocessing": get_backbone(backbone).preprocessing}
    if training is not None:
        meta["training"] = training
    return save_model(path, model.eval(), meta)


def with_metadata(model: Path, out: Path, change) -> Path:
    """A copy of `model` with its metadata replaced by change(metadata) (a dict, or anything JSON)."""
    import json

    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    with safe_open(str(model), framework="pt") as f:
        meta = json.loads(f.metadata()["fruitnet"])
    save_file(load_file(str(model)), str(out), metadata={"fruitnet": json.dumps(change(meta))})
    return out


def bad_metadata_cases() -> dict:
    """name -> (change to a good model's metadata, words the refusal must contain)."""
    pre = lambda m, **kw: {**m, "preprocessing": {**m["preprocessing"], **kw}}  # noqa: E731
    return {
        "missing-classes": (lambda m: {k: v for k, v in m.items() if k != "classes"}, "classes: missing"),
        "classes-not-a-list": (lambda m: {**m, "classes": "cherry,tomato"}, "classes: Input should be a valid list"),
        "input-size-a-string": (lambda m: pre(m, input_size="224"), "input_size: Input should be a valid integer"),
        "unknown-backbone": (lambda m: {**m, "backbone": "vit_huge"}, "unknown backbone 'vit_huge'"),
        "duplicate-classes": (lambda m: {**m, "classes": ["cherry", "cherry", "tomato"]}, "repeated: 'cherry'"),
        "empty-class-name": (lambda m: {**m, "classes": ["cherry", "", "tomato"]}, "classes.1"),
        "a-million-classes": (lambda m: {**m, "classes": [f"c{i}" for i in range(10**6)]}, "at most 10000 items"),
        "input-size-100000": (lambda m: pre(m, input_size=100000), "input_size: Input should be less than or equal to 1024"),
        "std-0": (lambda m: pre(m, std=[0, 0.5, 0.5]), "std.0: Input should be greater than 0"),
        "unknown-interpolation": (lambda m: pre(m, interpolation="lanczos"), "interpolation"),
        "head-for-other-classes": (lambda m: {**m, "classes": ["a", "b", "c", "d"]}, "the head's weights have shape [3, 1280]"),
        "not-an-object": (lambda m: [1, 2], "without fruitnet metadata"),
    }


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Served:
    url: str
    port: int
    proc: subprocess.Popen
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def peak_rss_mb(self) -> float:
        status = Path(f"/proc/{self.proc.pid}/status").read_text()
        return int(re.search(r"VmHWM:\s+(\d+) kB", status)[1]) / 1024


@contextmanager
def serving(model, *options, log_path: Path | None = None, preexec_fn=None, timeout: float = 180,
            command: str = "serve"):
    """`fruitnet serve MODEL OPTIONS` (or another command that serves, such as teach) as a user
    starts it, on a free loopback port: yields a Served once /health answers (RuntimeError with
    the server's log if it does not within `timeout` seconds), stops it afterwards. The log goes
    to log_path (appended) or a temporary file."""
    import httpx

    port = free_port()
    with tempfile.TemporaryDirectory() as tmp:
        log_path = Path(log_path or Path(tmp) / "serve.log")
        with open(log_path, "ab") as log:
            proc = subprocess.Popen([sys.executable, "-m", "fruitnet", command, str(model), "--port", str(port),
                                     *map(str, options)], stdout=log, stderr=subprocess.STDOUT, preexec_fn=preexec_fn)
        served = Served(f"http://127.0.0.1:{port}", port, proc, log_path)
        try:
            deadline = time.monotonic() + timeout
            while True:
                try:
                    if httpx.get(served.url + "/health", timeout=2).status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"fruitnet serve {model} did not come up:\n{served.log()}")
                time.sleep(0.3)
            yield served
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
