"""Numeric choices of a run: autocast dtype, GradScaler, determinism, and the hardware peak for MFU."""

from __future__ import annotations

import contextlib
import ctypes
import os
import time
from functools import lru_cache

import torch

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}

# Dense bf16/fp16 tensor-core peaks from the vendors' datasheets (FLOP/s), for MFU on GPUs.
GPU_PEAKS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "A10G": 125e12, "L40S": 362e12,
             "L4": 121e12, "V100": 125e12, "RTX 4090": 165e12, "RTX 3090": 71e12}


def cpu_has_bf16() -> bool:
    """bf16 matmuls are fast only with AVX512-BF16 or AMX; elsewhere they are emulated and slower than fp32."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith("flags")), "")
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def choose(precision: str, device: torch.device) -> str:
    if precision != "auto":
        return precision
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    if device.type == "cpu":
        return "bf16" if cpu_has_bf16() else "fp32"
    return "fp32"


def check(precision: str, device: torch.device) -> str | None:
    """Why the precision cannot run on the device, or None."""
    if precision == "fp16" and device.type != "cuda":
        return f"train.precision=fp16 needs a CUDA device (this run is on {device.type}); use bf16 or fp32"
    if precision == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        return "train.precision=bf16 is not supported by this GPU; use fp16"
    return None


def autocast(precision: str, device: torch.device):
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=DTYPES[precision])


def make_deterministic(enabled: bool, device: torch.device) -> None:
    if enabled and device.type == "cuda":
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # cuBLAS refuses determinism without it
    torch.use_deterministic_algorithms(enabled, warn_only=False)
    # Deterministic mode also fills every new tensor with NaN before a kernel overwrites it: that only makes
    # a kernel that reads memory it never wrote reproducible, and costs a write of each allocation.
    torch.utils.deterministic.fill_uninitialized_memory = False
    torch.backends.cudnn.benchmark = not enabled


def reuse_freed_memory() -> bool:
    """Keep memory that tensors free in this process, for the next step's tensors (glibc only; else a no-op).

    By default glibc maps every large allocation (logits, their gradient, the embedding's gradient) as fresh
    pages and unmaps them on free, so each training step page-faults and zeroes them all again, which is
    ~10x slower than writing reused memory. Call once, before training on a CPU; memory stays with the process.
    """
    try:
        libc = ctypes.CDLL(None)  # this process's symbols, the C library's among them
        M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4
        return bool(libc.mallopt(M_MMAP_MAX, 0) and libc.mallopt(M_TRIM_THRESHOLD, 2**30))
    except (OSError, AttributeError):
        return False


@lru_cache(maxsize=None)
def measured_peak(dtype: torch.dtype, n: int = 2048, seconds: float = 0.5) -> float:
    """FLOP/s of a large square torch.mm on this CPU: the honest denominator for MFU where no datasheet applies.

    The fastest call counts: other work on the machine only ever slows a call down. (A mean over 0.3 s once
    came out at half the peak at the start of `make train`, and the log showed MFU above 100%.)
    """
    a = torch.randn(n, n, dtype=dtype)
    b = torch.randn(n, n, dtype=dtype)
    torch.mm(a, b)  # warm-up
    fastest, end = float("inf"), time.perf_counter() + seconds
    while time.perf_counter() < end or fastest == float("inf"):
        start = time.perf_counter()
        torch.mm(a, b)
        fastest = min(fastest, time.perf_counter() - start)
    return 2 * n**3 / fastest


def peak_flops(device: torch.device, precision: str) -> float | None:
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        return next((peak for key, peak in GPU_PEAKS.items() if key in name), None)
    if device.type == "cpu":
        return measured_peak(DTYPES[precision])
    return None
