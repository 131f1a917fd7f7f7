"""Choosing where and in which precision a model runs."""

from __future__ import annotations

from functools import lru_cache

import torch

from .errors import ClipxferError

PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@lru_cache(maxsize=1)
def cpu_has_fast_bf16() -> bool:
    """True when the CPU multiplies bf16 natively (AMX or AVX512-BF16), so bf16 weights pay off."""
    try:
        with open("/proc/cpuinfo") as handle:
            flags = handle.read()
    except OSError:
        return False
    return "amx_bf16" in flags or "avx512_bf16" in flags


def choose_device(requested: str | None = None) -> torch.device:
    """``requested`` if given (``cpu``, ``cuda``, ``cuda:1``), else CUDA when present, else CPU."""
    if requested in (None, "", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(requested)
    except RuntimeError:
        raise ClipxferError(f"unknown device '{requested}': use cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ClipxferError(f"device '{requested}' asked for, but no CUDA GPU is visible: use --device cpu")
    return device


def choose_precision(device: torch.device, requested: str | None = None) -> torch.dtype:
    """The weight dtype: bf16 on CUDA (fp16 without bf16), bf16 on CPUs with AMX/AVX512-BF16, else fp32."""
    if requested not in (None, "", "auto"):
        if requested not in PRECISIONS:
            raise ClipxferError(f"unknown precision '{requested}': use one of {', '.join(PRECISIONS)} or auto")
        return PRECISIONS[requested]
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16 if cpu_has_fast_bf16() else torch.float32


def precision_name(dtype: torch.dtype) -> str:
    """``torch.bfloat16`` -> ``'bf16'``."""
    return {value: key for key, value in PRECISIONS.items()}[dtype]
