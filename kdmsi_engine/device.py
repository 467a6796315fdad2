"""Compute device choice and mixed precision.

``auto`` picks CUDA when torch sees a GPU, else the CPU. On CUDA, autocast runs in float16 (or
bfloat16 where supported); on CPUs with native bfloat16 (AVX512-BF16, AMX) autocast runs in
bfloat16 (DESIGN.md measured 3.15x over float32 for ResNet50 on such a CPU). CPUs without it
(AVX2 only, like the machines the tests run on) stay in float32: emulated bf16 is far slower.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from functools import lru_cache

import torch

from kdmsi_engine.errors import DeviceError

logger = logging.getLogger(__name__)


def resolve_device(spec: str = "auto") -> torch.device:
    """Turn ``auto``, ``cpu``, ``cuda`` or ``cuda:N`` into a device that exists.

    Raises:
        DeviceError: CUDA was asked for but is not available, or the index is out of range.
    """
    text = (spec or "auto").strip().lower()
    if text == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if text == "cpu":
        return torch.device("cpu")
    if text == "cuda" or text.startswith("cuda:"):
        if not torch.cuda.is_available():
            raise DeviceError(
                f"device {spec!r} asked for, but this torch sees no CUDA GPU; use --device cpu "
                "or point the plugin at a Python environment with a CUDA build of torch"
            )
        index = 0 if text == "cuda" else _parse_index(spec, text[5:])
        if index >= torch.cuda.device_count():
            raise DeviceError(
                f"device {spec!r} does not exist: {torch.cuda.device_count()} CUDA device(s) "
                "found; use cuda:0"
            )
        return torch.device("cuda", index)
    raise DeviceError(f"unknown device {spec!r}; use auto, cpu, cuda or cuda:N")


def _parse_index(spec: str, text: str) -> int:
    if not text.isdigit():
        raise DeviceError(f"unknown device {spec!r}; use auto, cpu, cuda or cuda:N")
    return int(text)


def describe_device(device: torch.device) -> str:
    """A human description: ``cpu (2 threads, bf16)`` or ``cuda:0 (NVIDIA H100)``."""
    if device.type == "cuda":
        return f"{device} ({torch.cuda.get_device_name(device)})"
    precision = "bf16" if cpu_supports_bf16() else "fp32"
    return f"cpu ({torch.get_num_threads()} threads, {precision})"


@lru_cache(maxsize=1)
def cpu_supports_bf16() -> bool:
    """Whether the CPU has native bfloat16 arithmetic (AVX512-BF16 or AMX)."""
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="ignore") as handle:
            flags = handle.read()
    except OSError:
        return False
    return " avx512_bf16" in flags or " amx_bf16" in flags


@contextlib.contextmanager
def autocast(device: torch.device, enabled: bool = True) -> Iterator[None]:
    """Mixed precision for forward passes: fp16/bf16 on CUDA, bf16 on capable CPUs."""
    if not enabled:
        yield
        return
    if device.type == "cuda":
        dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        with torch.autocast("cuda", dtype=dtype):
            yield
    elif cpu_supports_bf16():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            yield
    else:
        yield
