"""Compute device choice and mixed precision.

``auto`` picks CUDA when torch sees a GPU, else the CPU. On CUDA, autocast runs in float16 (or
bfloat16 where supported); on CPUs with native bfloat16 (AVX512-BF16, AMX) autocast runs in
bfloat16 (DESIGN.md measured 3.15x over float32 for ResNet50 on such a CPU). CPUs without it
(AVX2 only) stay in float32: emulated bf16 is far slower.

The environment variable ``KDMSI_CPU_PRECISION`` (``auto``, ``fp32`` or ``bf16``) forces the
CPU's inference precision, in this one place: tests run precision-sensitive code both ways on
every machine, and a user can rule bf16 out (or in).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from functools import lru_cache

import torch

from kdmsi_engine.errors import DeviceError, InputError

logger = logging.getLogger(__name__)

#: Environment variable that forces the CPU's autocast precision: auto, fp32 or bf16.
CPU_PRECISION_ENV = "KDMSI_CPU_PRECISION"
CPU_PRECISIONS = ("auto", "fp32", "bf16")


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
                f"device {spec!r} asked for, but this torch sees no CUDA GPU; use device cpu "
                "or point the plugin at a Python environment with a CUDA build of torch",
                parameters=("device",),
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
    return f"cpu ({torch.get_num_threads()} threads, {cpu_precision()})"


@lru_cache(maxsize=1)
def cpu_supports_bf16() -> bool:
    """Whether the CPU has native bfloat16 arithmetic (AVX512-BF16 or AMX)."""
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="ignore") as handle:
            flags = handle.read()
    except OSError:
        return False
    return " avx512_bf16" in flags or " amx_bf16" in flags


def cpu_precision() -> str:
    """The CPU's inference precision: ``$KDMSI_CPU_PRECISION``, or bf16 where it is native."""
    import os

    value = os.environ.get(CPU_PRECISION_ENV, "auto").strip().lower() or "auto"
    if value not in CPU_PRECISIONS:
        raise InputError(
            f"{CPU_PRECISION_ENV}={value!r} is not one of {', '.join(CPU_PRECISIONS)}; unset it "
            "or give fp32 or bf16"
        )
    if value == "auto":
        return "bf16" if cpu_supports_bf16() else "fp32"
    return value


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
    elif cpu_precision() == "bf16":
        with torch.autocast("cpu", dtype=torch.bfloat16):
            yield
    else:
        yield
