"""Fast arithmetic: bf16 autocast and channels-last where the hardware runs them natively.

bf16 halves memory traffic and, on CPUs with AVX512-BF16 or AMX (and on CUDA GPUs with bf16),
runs the same network two to several times faster than fp32; elsewhere it would be emulated
and slower, so 'auto' falls back to fp32.  Weights and the optimiser stay fp32 (autocast).
"""

from __future__ import annotations

import contextlib
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from fruitnet.config import PRECISIONS
from fruitnet.errors import UsageError


DEVICES = ("auto", "cpu", "cuda")  # and cuda:N


def resolve_device(name: str) -> torch.device:
    """'auto': CUDA when present, else the CPU; 'cpu'; 'cuda' or 'cuda:N' where there is one."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UsageError(f"--device {name}: not a device; use auto, cpu, cuda or cuda:N") from None
    if device.type not in ("cpu", "cuda"):
        raise UsageError(f"--device {name}: fruitnet runs on auto, cpu, cuda or cuda:N")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError(f"--device {name}: no CUDA device here; use --device cpu (or auto)")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise UsageError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return device


def cpu_has_native_bf16() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:  # not Linux: be conservative
        return False
    return any(flag in flags.split() for flag in ("avx512_bf16", "amx_bf16"))


@dataclass(frozen=True)
class Arithmetic:
    dtype: str  # 'fp32' | 'bf16'
    channels_last: bool
    reason: str

    def autocast(self, device: torch.device):
        if self.dtype != "bf16":
            return contextlib.nullcontext()
        return torch.autocast(device.type, dtype=torch.bfloat16)

    def prepare_model(self, model: torch.nn.Module) -> torch.nn.Module:
        return model.to(memory_format=torch.channels_last) if self.channels_last else model

    def prepare_input(self, x: torch.Tensor) -> torch.Tensor:
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last and x.dim() == 4 else x

    def as_dict(self) -> dict:
        return asdict(self)


def choose_arithmetic(precision: str, device: torch.device) -> Arithmetic:
    """Resolve 'auto' | 'fp32' | 'bf16' for a device, saying why."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, not {precision!r}")
    if device.type == "cuda":
        native = torch.cuda.is_bf16_supported()
        why = "CUDA GPU with bf16" if native else "CUDA GPU without bf16"
    else:
        native = cpu_has_native_bf16()
        why = "CPU with AVX512-BF16/AMX" if native else "CPU without AVX512-BF16/AMX"
    if precision == "auto":
        dtype = "bf16" if native else "fp32"
        reason = f"auto: {why}"
    else:
        dtype, reason = precision, f"asked for {precision} ({why})"
    # channels-last is what oneDNN's and cuDNN's fast convolution kernels want
    return Arithmetic(dtype=dtype, channels_last=dtype == "bf16", reason=reason)
