"""Numeric choices of a run: autocast dtype, GradScaler, determinism, and the hardware peak for MFU."""

from __future__ import annotations

import contextlib
import ctypes
import inspect
import os
import time
from functools import lru_cache

import torch

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def _peaks(bf16: float | None, fp16: float | None, tf32: float | None, fp32: float | None) -> dict[str, float]:
    """TFLOP/s per format -> FLOP/s; a format without a number (None) is measured (measured_peak)."""
    given = {"bf16": bf16, "fp16": fp16, "tf32": tf32, "fp32": fp32}
    return {k: v * 1e12 for k, v in given.items() if v is not None}


# Dense peaks (no 2:4 sparsity: the datasheets' "*" figures are twice these) from the vendors' datasheets, in
# TFLOP/s: bf16 and fp16 tensor cores, tf32 tensor cores (fp32 training with TF32 matmuls allowed), plain fp32.
# Keyed by the exact torch.cuda.get_device_name(): "NVIDIA L4" is not "NVIDIA L40S", an H100 PCIe is not an
# SXM. A GPU not listed here, or a format it has no number for, gets its peak measured with a matmul, as on CPU.
#   H100 SXM 989.4 / 494.7 / 66.9; H100 PCIe 756.5 / 378 / 51.2; H100 NVL 835.5 / 417.5 / 60 (H100 datasheet)
#   H200 SXM 989.4 / 494.7 / 66.9; H200 NVL 835.5 / 417.5 / 60 (H200 datasheet); B200 2250 / 1125 / 75 (HGX B200
#   per GPU: 36 PFLOPS bf16 and 18 TF32 sparse, 600 TFLOPS fp32, over 8 GPUs); A100 SXM and PCIe 312 / 156 / 19.5
#   A10 125 / 62.5 / 31.2; L4 121 / 60 / 30.3; L40S 362 / 183 / 91.6; L40 181 / 90.5 / 90.5
#   V100 SXM2 125 fp16 / 15.7; V100 PCIe 112 / 14; V100S 130 / 16.4; T4 65 fp16 / 8.1 (no bf16, no TF32)
#   RTX 4090 165.2 / 82.6 / 82.6 (Ada whitepaper, fp32 accumulate); RTX 3090 71 / 35.6 / 35.6 (GA102 whitepaper)
#   MI300X 1307.4 bf16/fp16 (AMD datasheet); fp32 measured: whether ROCm runs fp32 matmuls as xf32 varies
# The A10G (AWS) has no NVIDIA datasheet: measured.
_H100_SXM = _peaks(989.4, 989.4, 494.7, 66.9)
_H100_NVL = _peaks(835.5, 835.5, 417.5, 60)
_A100 = _peaks(312, 312, 156, 19.5)
GPU_PEAKS: dict[str, dict[str, float]] = {
    "NVIDIA H100 80GB HBM3": _H100_SXM,
    "NVIDIA H100 PCIe": _peaks(756.5, 756.5, 378, 51.2),
    "NVIDIA H100 NVL": _H100_NVL,
    "NVIDIA H200": _H100_SXM,
    "NVIDIA H200 NVL": _H100_NVL,
    "NVIDIA B200": _peaks(2250, 2250, 1125, 75),
    "NVIDIA A100-SXM4-40GB": _A100,
    "NVIDIA A100-SXM4-80GB": _A100,
    "NVIDIA A100-PCIE-40GB": _A100,
    "NVIDIA A100 80GB PCIe": _A100,
    "NVIDIA A10": _peaks(125, 125, 62.5, 31.2),
    "NVIDIA L4": _peaks(121, 121, 60, 30.3),
    "NVIDIA L40S": _peaks(362, 362, 183, 91.6),
    "NVIDIA L40": _peaks(181, 181, 90.5, 90.5),
    "Tesla V100-SXM2-16GB": _peaks(None, 125, None, 15.7),
    "Tesla V100-SXM2-32GB": _peaks(None, 125, None, 15.7),
    "Tesla V100-PCIE-16GB": _peaks(None, 112, None, 14),
    "Tesla V100-PCIE-32GB": _peaks(None, 112, None, 14),
    "Tesla V100S-PCIE-32GB": _peaks(None, 130, None, 16.4),
    "Tesla T4": _peaks(None, 65, None, 8.1),
    "NVIDIA GeForce RTX 4090": _peaks(165.2, 165.2, 82.6, 82.6),
    "NVIDIA GeForce RTX 3090": _peaks(71, 71, 35.6, 35.6),
    "AMD Instinct MI300X": _peaks(1307.4, 1307.4, None, None),
    "AMD Instinct MI300X VF": _peaks(1307.4, 1307.4, None, None),
}


def cpu_has_bf16() -> bool:
    """bf16 matmuls are fast only with AVX512-BF16 or AMX; elsewhere they are emulated and slower than fp32."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith("flags")), "")
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def cuda_has_bf16(device: torch.device | None = None) -> bool:
    """bf16 in the GPU's hardware (compute capability 8.0 on: A100, H100, L4, RTX 30xx; ROCm's GPUs).

    Not torch.cuda.is_bf16_supported(), which by default also counts the emulation on older GPUs (T4, and V100
    with a recent CUDA): emulated bf16 is slow, and keeps torch.compile from compiling the model. Its
    including_emulation=False (torch 2.3 on) asks about the current device: pick_device has set it."""
    if "including_emulation" in inspect.signature(torch.cuda.is_bf16_supported).parameters:
        return torch.cuda.is_bf16_supported(including_emulation=False)
    return bool(getattr(torch.version, "hip", None)) or torch.cuda.get_device_capability(device)[0] >= 8


def choose(precision: str, device: torch.device) -> str:
    if precision != "auto":
        return precision
    if device.type == "cuda":
        return "bf16" if cuda_has_bf16(device) else "fp16"  # fp16 trains with a GradScaler (train.py)
    if device.type == "cpu":
        return "bf16" if cpu_has_bf16() else "fp32"
    return "fp32"


def check(precision: str, device: torch.device) -> str | None:
    """Why the precision cannot run on the device, or None."""
    if precision == "fp16" and device.type != "cuda":
        return f"train.precision=fp16 needs a CUDA device (this run is on {device.type}); use bf16 or fp32"
    if precision == "bf16" and device.type == "cuda" and not cuda_has_bf16(device):
        return ("train.precision=bf16 has no hardware support on this GPU (compute capability below 8.0: torch "
                "would emulate it, slowly); use fp16 or precision=auto")
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


def _affordable(n: int, dtype: torch.dtype, seconds: float = 0.1) -> int:
    """The largest square size up to n whose matmul takes about `seconds` here: a CPU without native bf16 runs a
    2048-square bf16 matmul on one thread for a minute (measured: 0.27 GFLOP/s), which would stall every start."""
    a = torch.ones(256, 256, dtype=dtype)
    torch.mm(a, a)
    start = time.perf_counter()
    torch.mm(a, a)
    rate = 2 * 256**3 / max(time.perf_counter() - start, 1e-9)
    return max(256, min(n, int((seconds * rate / 2) ** (1 / 3))))


@lru_cache(maxsize=None)
def measured_peak(dtype: torch.dtype, n: int = 2048, seconds: float = 0.5, device: str = "cpu") -> float:
    """FLOP/s of a large square torch.mm on this CPU (or on `device`, a GPU no datasheet number covers): the
    honest denominator for MFU where no datasheet applies.

    The fastest call counts: other work on the machine only ever slows a call down. (A mean over 0.3 s once
    came out at half the peak at the start of `make train`, and the log showed MFU above 100%.) On a GPU the
    matrices are at least 8192 square, so that a call takes long against its launch and the synchronization.
    """
    where = torch.device(device)
    on_gpu = where.type == "cuda"
    n = max(n, 8192) if on_gpu else _affordable(n, dtype)
    sync = torch.cuda.synchronize if on_gpu else (lambda: None)
    gen = torch.Generator(device=where).manual_seed(0)  # its own: the run's RNG is restored before this runs
    a = torch.randn(n, n, dtype=dtype, device=where, generator=gen)
    b = torch.randn(n, n, dtype=dtype, device=where, generator=gen)
    torch.mm(a, b)  # warm-up
    sync()
    fastest, end = float("inf"), time.perf_counter() + seconds
    while time.perf_counter() < end or fastest == float("inf"):
        start = time.perf_counter()
        torch.mm(a, b)
        sync()
        fastest = min(fastest, time.perf_counter() - start)
    del a, b
    if on_gpu:
        torch.cuda.empty_cache()  # the training's memory, not the measurement's
    return 2 * n**3 / fastest


def peak_flops(device: torch.device, precision: str) -> float | None:
    """The FLOP/s that MFU divides by: the datasheet's dense peak for this GPU and precision (fp32 with TF32
    matmuls allowed: the TF32 peak), else the fastest matmul measured here (once per machine: see remembered)."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        peaks = GPU_PEAKS.get(name, {})
        form = "tf32" if precision == "fp32" and torch.backends.cuda.matmul.allow_tf32 and "tf32" in peaks else precision
        return peaks.get(form) or remembered(f"{name}|{precision}",
                                             lambda: measured_peak(DTYPES[precision], device=str(device)))
    if device.type == "cpu":
        return remembered(f"cpu {os.cpu_count()} {torch.get_num_threads()} threads|{precision}",
                          lambda: measured_peak(DTYPES[precision]))
    return None


def remembered(what: str, measure) -> float:
    """A measured peak, kept per host (and torch version) in the user's cache: measuring takes a second or more,
    and a restart after a preemption should not pay it again. An unwritable cache only means measuring each time."""
    import json
    import socket
    from pathlib import Path

    path = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "gpt-train" / "peak_flops.json"
    key = f"{socket.gethostname()}|torch {torch.__version__}|{what}"
    try:
        known = json.loads(path.read_text())
    except (OSError, ValueError):
        known = {}
    if not isinstance(known, dict):
        known = {}
    if isinstance(known.get(key), (int, float)):
        return float(known[key])
    value = measure()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps({**known, key: value}))
        os.replace(tmp, path)
    except OSError:
        pass
    return value
