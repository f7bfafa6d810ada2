"""What this CPU is and how fast its matmuls run: the MFU denominator, and whether bf16 pays.

The peak is measured, not looked up: CPUs with the same flags differ. A Xeon VM with AVX512-BF16
and no AMX ran bf16 matmuls at half its fp32 rate (bf16 autocast trained at ~0.6x fp32); an AMD
EPYC with the same flags runs them at 2.2x (0.39 vs 0.17 TFLOP/s, 2026-12-04); AMX runs them at
~6x. So `trainer.precision=auto` asks the measured peaks (engine/setup.py: resolve_precision).
"""

from __future__ import annotations

import json
import os
import platform
import time
from functools import lru_cache
from pathlib import Path
from typing import Optional

import torch

# bf16 autocast re-casts weights and activations every step and not every kernel gains (SDPA at
# short sequences runs slower in bf16 there), so a step gains less than its matmuls: at a 2.2x
# peak ratio the 58M bench step gained 1.53x, the quickstart's 1.26x, its SFT steps nothing.
BF16_MIN_GAIN = 1.5


@lru_cache(maxsize=1)
def cpu_model_and_flags() -> tuple[str, frozenset]:
    """The CPU's model name and feature flags from /proc/cpuinfo (empty where there is none)."""
    model, flags = "", frozenset()
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("model name") and not model:
                    model = line.split(":", 1)[1].strip()
                elif line.startswith("flags") and not flags:
                    flags = frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return model, flags


# The precisions whose matmuls run in bf16.
BF16_PRECISIONS = ("bf16", "bf16-autocast")


def measure_cpu_peak_tflops(
    precision: str, sizes: tuple[int, ...] = (512, 1024, 2048, 4096), repeats: int = 3, next_size_below_s: float = 0.15
) -> float:
    """The machine's matmul peak in TFLOP/s: the best of `repeats` square matmuls per size, in
    the step's precision, after one warm-up (oneDNN picks and caches its kernel). Large sizes,
    because small ones never reach the peak (at 512 and 1024 the figure came out a third low, so
    MFU against it read high); the next size (8x the work) only while the fastest matmul of this
    size took under `next_size_below_s`. Where a precision has no fast kernel (bf16 on a CPU with only
    AVX2: 0.001 TFLOP/s against fp32's 0.18 on an AMD EPYC), 4096^3 would take minutes per
    matmul; there it stops at 512, and the figure says bf16 does not pay."""
    dtype = torch.bfloat16 if precision in BF16_PRECISIONS else torch.float32
    best = 0.0
    for size in sizes:
        a = torch.randn(size, size, dtype=dtype)
        b = torch.randn(size, size, dtype=dtype)
        a @ b
        fastest = float("inf")
        for _ in range(repeats):
            start = time.perf_counter()
            a @ b
            fastest = min(fastest, time.perf_counter() - start)
        best = max(best, 2 * size**3 / fastest / 1e12)
        if fastest >= next_size_below_s:
            break
    return best


def _peak_cache_file() -> Path:
    """MOSS_TRAIN_PEAK_CACHE, else ~/.cache/moss-train/cpu_matmul_peak.json (XDG_CACHE_HOME honoured).
    The test suite points it at its own file: its runs share the cores with each other and must
    not leave a loaded machine's figure in the user's cache."""
    if os.environ.get("MOSS_TRAIN_PEAK_CACHE"):
        return Path(os.environ["MOSS_TRAIN_PEAK_CACHE"])
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(root) / "moss-train" / "cpu_matmul_peak.json"


# The CPU flags that decide which matmul kernels run (AMX and AVX512-BF16 change bf16 by 10x).
MATMUL_FLAGS = ("amx_bf16", "amx_tile", "avx512_bf16", "avx512f", "avx2", "fma")


def cpu_identity() -> str:
    model, flags = cpu_model_and_flags()
    model = model or platform.processor() or platform.machine()  # processor() runs `uname -p`: only without cpuinfo
    return f"{model} [{' '.join(f for f in MATMUL_FLAGS if f in flags) or 'no listed flags'}]"


def measurement_cache_key(what: str) -> str:
    """The cache entry of a measurement on this CPU: model and flags, what, threads, torch."""
    return f"{cpu_identity()} | {what} | {torch.get_num_threads()} threads | torch {torch.__version__}"


def peak_cache_key(dtype: str) -> str:
    """The cache entry of a matmul peak, "fp32" or "bf16"."""
    return measurement_cache_key(dtype)


def cpu_peak_tflops(precision: str, cache_file: Optional[Path] = None, remeasure: bool = False) -> tuple[float, str]:
    """The CPU matmul peak for MFU, kept in ~/.cache/moss-train per CPU model and flags,
    precision, thread count and torch version. A training run measures it only when there is
    no entry yet (it costs seconds); ``remeasure`` (the benchmarks) measures again, and the
    cache keeps the best figure ever measured, so a first measurement on a loaded machine does
    not stay the denominator. Returns (TFLOP/s, a line saying what it is and where it came from)."""
    cache_file = cache_file or _peak_cache_file()
    dtype = "bf16" if precision in BF16_PRECISIONS else "fp32"
    key = peak_cache_key(dtype)
    cache = _read_cache(cache_file)
    cached = float(cache[key]) if isinstance(cache.get(key), (int, float)) else 0.0
    if cached > 0 and not remeasure:
        peak, source = cached, f"cached ({cache_file})"
    else:
        measured = measure_cpu_peak_tflops(precision)
        peak = max(measured, cached)
        source = f"measured {measured:.3f} now" + (f", best cached {cached:.3f}" if cached else "") + f" ({cache_file})"
        if measured > cached:
            _write_atomically(cache_file, {**cache, key: measured})
    return peak, f"CPU {dtype} matmul peak {peak:.3f} TFLOP/s (best 2048^3 / 4096^3 matmul), {source}"


def _read_cache(path: Path) -> dict:
    try:
        cache = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}  # none yet, or corrupt: measured over
    return cache if isinstance(cache, dict) else {}


def _write_atomically(path: Path, data: dict) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(data, indent=1, sort_keys=True))
        os.replace(tmp, path)  # concurrent runs: the last writer wins, no file is ever half written
    except OSError:
        pass  # a read-only home only costs the cache


def bf16_slowdown_warning() -> str | None:
    """A line for a run that asked for bf16 on a CPU whose bf16 matmuls measure slower than its
    fp32 ones (an AVX2-only AMD EPYC: 0.001 against 0.18 TFLOP/s), else None."""
    bf16, fp32 = cpu_peak_tflops("bf16")[0], cpu_peak_tflops("fp32")[0]
    if bf16 >= fp32:
        return None
    return (
        f"[moss-train] warning: bf16 matmuls on this CPU measure {bf16:.3f} TFLOP/s against fp32's {fp32:.3f} "
        f"({fp32 / bf16:.0f}x slower); trainer.precision=auto or fp32 would train faster"
    )


def bf16_matmuls_pay() -> bool:
    """Whether bf16 matmuls run at least BF16_MIN_GAIN times fp32's on this CPU (both peaks
    measured once and cached, as the MFU peak is)."""
    return cpu_peak_tflops("bf16")[0] >= BF16_MIN_GAIN * cpu_peak_tflops("fp32")[0]


# Lengths at which causal attention is timed in both precisions, each over about 8192 tokens.
SDPA_LENGTHS = (64, 128, 256, 512, 1024, 2048)


def measure_causal_sdpa_seconds(dtype: torch.dtype, length: int, n_head: int, head_dim: int, repeats: int = 3) -> float:
    """Best forward + backward time of SDPA's causal attention at one length, after a warm-up."""
    import torch.nn.functional as F

    shape = (max(1, 8192 // length), n_head, length, head_dim)
    q, k, v = (torch.randn(shape, dtype=dtype, requires_grad=True) for _ in range(3))
    best = float("inf")
    for _ in range(repeats + 1):
        start = time.perf_counter()
        F.scaled_dot_product_attention(q, k, v, is_causal=True).sum().backward()
        best = min(best, time.perf_counter() - start)
    return best


def bf16_attention_fp32_below(n_head: int, head_dim: int, max_length: int) -> int:
    """The length below which this CPU's causal SDPA is faster in fp32 than in bf16 (for the
    model's heads): bf16 must win at that length and every longer one measured. 0 where bf16
    always wins. Measured once per CPU, head shape, threads and torch, kept beside the peaks."""
    cache_file = _peak_cache_file()
    key = measurement_cache_key(f"sdpa fp32 below, {n_head} x {head_dim}")
    cache = _read_cache(cache_file)
    if isinstance(cache.get(key), int):
        return cache[key]
    lengths = [n for n in SDPA_LENGTHS if n <= max(max_length, SDPA_LENGTHS[0])]
    below = 0
    for length in reversed(lengths):  # from the longest: the first where fp32 wins sets the line
        bf16, fp32 = (measure_causal_sdpa_seconds(d, length, n_head, head_dim) for d in (torch.bfloat16, torch.float32))
        if bf16 > fp32:
            below = max_length + 1 if length == lengths[-1] else length + 1
            break
    _write_atomically(cache_file, {**cache, key: below})
    return below
