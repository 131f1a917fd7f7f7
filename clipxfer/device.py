"""Choosing where, in which runtime (torch or OpenVINO) and in which precision a model runs."""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from functools import lru_cache

import torch

from .errors import ClipxferError

PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


RUNTIMES = ("torch", "openvino")
#: Precision names a caller may ask for; ``float`` means "auto, but not int8" (used to reopen
#: artifacts made with a float model).
PRECISION_CHOICES = ("auto", "float", "fp32", "bf16", "fp16", "int8")
#: CPU flags (as /proc/cpuinfo spells them) that give int8 dot products: VNNI or AMX-INT8.
INT8_FLAGS = frozenset({"avx512_vnni", "avx_vnni", "amx_int8"})
BF16_FLAGS = frozenset({"avx512_bf16", "amx_bf16"})
#: OpenVINO float precision on CPUs with native bf16: 3.3-3.9x torch fp32 against 1.7-1.9x for
#: OpenVINO fp32, cosine 0.99994 (benchmarks/RESULTS.md).
FLOAT_OPENVINO_WITH_BF16 = "bf16"


@lru_cache(maxsize=1)
def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags from /proc/cpuinfo (empty where there is none)."""
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def cpu_has_fast_bf16() -> bool:
    """True when the CPU multiplies bf16 natively (AMX or AVX512-BF16), so bf16 weights pay off."""
    return bool(BF16_FLAGS & cpu_flags())


def openvino_available() -> bool:
    """True when the ``openvino`` extra (openvino and nncf) is installed."""
    return all(importlib.util.find_spec(name) is not None for name in ("openvino", "nncf"))


@dataclass(frozen=True)
class Compute:
    """Where the image tower runs and in which precision."""

    runtime: str
    precision: str

    def __str__(self) -> str:
        return f"{self.runtime}:{self.precision}"


def auto_cpu_compute(flags: frozenset[str], have_openvino: bool, allow_int8: bool = True) -> Compute:
    """The fastest measured-safe choice for a CPU with these flags (see README, "OpenVINO runtime").

    Measured on a 2-core AVX512-BF16 + VNNI CPU (benchmarks/RESULTS.md): OpenVINO int8 beats every
    float option by far, and its embeddings stay within cosine 0.99 of fp32 (for models whose
    int8 passed that gate, see ``Encoder.int8_by_default``); VNNI (or AMX-INT8) is what makes
    int8 fast, so it needs one of those flags. Among float options OpenVINO bf16 where bf16 is
    native, else OpenVINO fp32. Without OpenVINO the torch rule stands: bf16
    weights where bf16 is native, else fp32 (torch bf16 without it runs 4x slower).
    """
    if have_openvino:
        if allow_int8 and INT8_FLAGS & flags:
            return Compute("openvino", "int8")
        return Compute("openvino", FLOAT_OPENVINO_WITH_BF16 if BF16_FLAGS & flags else "fp32")
    return Compute("torch", "bf16" if BF16_FLAGS & flags else "fp32")


def split_compute(requested: str | None) -> tuple[str, str]:
    """``'openvino:int8'`` -> ('openvino', 'int8'); ``'int8'`` -> ('auto', 'int8'); None -> ('auto', 'auto').

    The CLI folds ``--runtime`` into the precision string this way, so every API that passes a
    ``precision`` on to :func:`~clipxfer.encoders.load_encoder` carries the runtime too.
    """
    requested = (requested or "auto").lower()
    runtime, _, precision = requested.rpartition(":")
    runtime, precision = runtime or "auto", precision or "auto"
    if runtime not in ("auto", *RUNTIMES):
        raise ClipxferError(f"unknown runtime '{runtime}': use auto, torch or openvino")
    if precision not in PRECISION_CHOICES:
        raise ClipxferError(f"unknown precision '{precision}': use auto, fp32, bf16, fp16 or int8")
    return runtime, precision


def join_compute(runtime: str | None, precision: str | None) -> str:
    """The inverse of :func:`split_compute` (``auto`` parts are left out)."""
    runtime, precision = runtime or "auto", precision or "auto"
    return precision if runtime == "auto" else f"{runtime}:{precision}"


def choose_compute(device: torch.device, requested: str | None = None) -> Compute:
    """Runtime and precision for ``device`` from a request like ``auto``, ``int8`` or ``torch:bf16``.

    CUDA always runs torch. On the CPU, ``auto`` follows :func:`auto_cpu_compute`; the
    ``CLIPXFER_RUNTIME`` environment variable (torch or openvino) decides the runtime of a fully
    automatic request instead.
    An explicit float precision without a runtime runs in torch; int8 exists only in OpenVINO.
    """
    runtime, precision = split_compute(requested)
    if runtime == "auto" and precision in ("auto", "float"):
        runtime = os.environ.get("CLIPXFER_RUNTIME", "auto").lower() or "auto"
        if runtime not in ("auto", *RUNTIMES):
            raise ClipxferError(f"CLIPXFER_RUNTIME={runtime}: use auto, torch or openvino")
    if device.type != "cpu":
        if runtime == "openvino" or precision == "int8":
            raise ClipxferError("the OpenVINO runtime and int8 run on the CPU: use --device cpu, or --runtime torch")
        return Compute("torch", precision_name(choose_precision(device, None if precision == "float" else precision)))
    if runtime == "auto":
        if precision == "int8":
            runtime = "openvino"
        elif precision in ("auto", "float"):
            return auto_cpu_compute(cpu_flags(), openvino_available(), allow_int8=precision == "auto")
        else:
            runtime = "torch"
    if runtime == "torch":
        if precision == "int8":
            raise ClipxferError("int8 runs in OpenVINO only: use --runtime openvino (or auto) with --precision int8")
        return Compute("torch", precision_name(choose_precision(device, None if precision == "float" else precision)))
    if precision in ("auto", "float"):
        return auto_cpu_compute(cpu_flags(), True, allow_int8=precision == "auto")
    return Compute("openvino", precision)


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
