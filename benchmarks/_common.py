"""Shared helpers of the benchmark suites: shapes and their CPU scaling, timing, host-sync and launch counting.

Benchmarks are not tests: nothing here asserts a timing. Knobs (environment variables, all optional):

* ``DGG_BENCH_DEVICE``: ``cuda`` or ``cpu`` (default: ``cuda`` when available, else ``cpu``).
* ``DGG_BENCH_SMOKE=1``: tiny shapes and one round everywhere (what ``tests/test_benchmarks_smoke.py`` uses).
* ``DGG_BENCH_CPU_ELEMS``: element budget of one scaled lm_head on CPU (default: the power of two >= the last-level
  cache in bytes, at least ``2**24``: a bf16 lm_head is >= 2x the cache, fp32 >= 4x; see :func:`lm_head_shape`).
* ``DGG_BENCH_FLUSH_BYTES``: size of the cache-flush buffer (default: 2x the last-level cache, read from sysfs on
  CPU / ``L2_cache_size`` on CUDA; at least 64 MiB).
* ``DGG_BENCH_FULL=1``: the real lm_head shapes on CPU too (about 2 GB per fp32 tensor; slow).
* ``DGG_BENCH_STEP_PARAMS``: parameter count of the optimizer-step sets (default ``2**25`` CPU, ``2**30`` CUDA).
* ``DGG_BENCH_ROUNDS``: timed rounds of each optimizer-step benchmark, and the least A/B pairs of its paired ratio
  (15); ``DGG_BENCH_PAIR_BUDGET_S`` (10): seconds the step pairs may take beyond that (up to 200 pairs).
* ``DGG_BENCH_ENERGY_PAIR_BUDGET_S``: seconds of paired roofline comparison per energy method (3; 3 to 60 pairs).
* ``DGG_BENCH_CLOCK``: ``wall`` (default) or ``process``: the clock of the paired ratios. ``process`` is the CPU time
  of this process (``time.process_time``): time slices taken by other processes on a shared box do not count, so
  the ratios stay usable under load; CPU only, and meant for one pinned thread (with several threads, a thread
  waiting for a preempted sibling may spin and count). pytest-benchmark's own timer: ``--benchmark-timer``.
"""

from __future__ import annotations

import collections
import math
import os
import platform
import statistics
from typing import Callable

import torch

aten = torch.ops.aten

# ---------------------------------------------------------------------------------------------------- settings


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() not in ("", "0", "false", "no")


SMOKE = _env_flag("DGG_BENCH_SMOKE")


def bench_device() -> torch.device:
    want = os.environ.get("DGG_BENCH_DEVICE", "").strip().lower()
    if want in ("", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if want not in ("cpu", "cuda"):
        raise ValueError(f"DGG_BENCH_DEVICE must be 'cpu' or 'cuda', got {want!r}")
    if want == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("DGG_BENCH_DEVICE=cuda but torch.cuda.is_available() is False")
    return torch.device(want)


DEVICE = bench_device()
IS_CUDA = DEVICE.type == "cuda"
CLOCK = os.environ.get("DGG_BENCH_CLOCK", "wall").strip().lower() or "wall"
if CLOCK not in ("wall", "process"):
    raise ValueError(f"DGG_BENCH_CLOCK must be 'wall' or 'process', got {CLOCK!r}")
if CLOCK == "process" and IS_CUDA:
    raise ValueError("DGG_BENCH_CLOCK=process measures CPU time: meaningless for GPU work")
NO_CUDA_REASON = "no CUDA device in this process (the GPU parts of the suite need one)"

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}

# ---------------------------------------------------------------------------------------------------- shapes

#: lm_head (vocab x hidden) of real models. Qwen2.5-0.5B ties it to the input embedding.
LM_HEADS = {
    "Qwen2.5-7B": (152064, 3584),
    "Llama-3-8B": (128256, 4096),
    "Qwen2.5-0.5B": (151936, 896),
}


def last_level_cache_bytes() -> tuple[int | None, str]:
    """The bench device's last-level cache in bytes, and where the number came from (None if unknown).

    CPU: the largest unified cache of cpu0 in sysfs (``/sys/devices/system/cpu/cpu0/cache/index*/``), else
    ``lscpu``'s L3 line. CUDA: ``torch.cuda.get_device_properties().L2_cache_size``."""
    if IS_CUDA:
        l2 = getattr(torch.cuda.get_device_properties(DEVICE), "L2_cache_size", 0)
        return (int(l2), "cuda device properties (L2)") if l2 else (None, "unknown")
    best = None
    root = "/sys/devices/system/cpu/cpu0/cache"
    try:
        for d in sorted(os.listdir(root)):
            if not d.startswith("index"):
                continue
            with open(os.path.join(root, d, "type")) as f:
                if f.read().strip() not in ("Unified", "Data"):
                    continue
            with open(os.path.join(root, d, "level")) as f:
                level = int(f.read())
            with open(os.path.join(root, d, "size")) as f:
                txt = f.read().strip().upper()
            mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(txt[-1:], 1)
            size = int(txt.rstrip("KMG")) * mult
            if best is None or level > best[0]:
                best = (level, size)
    except (OSError, ValueError):
        best = None
    if best is not None:
        return best[1], f"sysfs (L{best[0]})"
    try:
        import subprocess

        out = subprocess.run(["lscpu", "-B"], capture_output=True, text=True, timeout=5).stdout
        for line in out.splitlines():
            if line.startswith("L3 cache:"):
                return int(line.split(":", 1)[1].split()[0]), "lscpu (L3)"
    except (OSError, ValueError, subprocess.SubprocessError):
        pass
    return None, "unknown"


LLC_BYTES, LLC_SOURCE = last_level_cache_bytes()


def _default_cpu_elems() -> int:
    llc = LLC_BYTES or (32 << 20)
    return max(2**24, 1 << max(0, (llc - 1).bit_length()))


CPU_ELEMS = int(os.environ.get("DGG_BENCH_CPU_ELEMS", str(_default_cpu_elems())))


def lm_head_shape(model: str) -> tuple[tuple[int, int], str]:
    """The lm_head shape benchmarked for ``model`` on this device, and how it was scaled (a sentence).

    On CUDA: the real shape. On CPU: the vocabulary (rows) is divided by the power of two that brings the matrix
    closest to ``DGG_BENCH_CPU_ELEMS`` elements (by default the power of two >= the last-level cache in bytes, so
    a bf16/fp16 matrix is ~2x and an fp32 one ~4x the cache and every read streams from DRAM; 2**25 elements for a
    32 MiB L3); the hidden size is kept.
    """
    rows, cols = LM_HEADS[model]
    if SMOKE:
        return (max(rows // 4096, 2), max(cols // 64, 2)), "smoke: rows/4096, cols/64"
    if IS_CUDA or _env_flag("DGG_BENCH_FULL"):
        return (rows, cols), "full size"
    k = max(0, round(math.log2(rows * cols / CPU_ELEMS)))
    return (rows >> k, cols), f"rows/{2**k} (hidden kept)"


def make_grad(shape: tuple[int, ...], dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    """A gradient-like tensor (N(0, 0.01^2)) of ``shape``/``dtype`` on the bench device, made in chunks."""
    g = torch.empty(shape, dtype=dtype, device=DEVICE)
    gen = torch.Generator(device=DEVICE).manual_seed(seed)
    flat = g.view(-1)
    step = 1 << 24
    for i in range(0, flat.numel(), step):
        chunk = flat[i : i + step]
        chunk.copy_(torch.randn(chunk.shape, generator=gen, device=DEVICE, dtype=torch.float32).mul_(0.01))
    return g


def as_fp32_bytes(g: torch.Tensor) -> torch.Tensor:
    """The bytes of contiguous ``g`` reinterpreted as float32 (no copy): what the read roofline sums."""
    b = g.contiguous().view(-1).view(torch.uint8)
    n = b.numel() // 4 * 4
    return b[:n].view(torch.float32)


# ---------------------------------------------------------------------------------------------------- backends

_UNUSABLE: dict[str, str | None] = {}


def energy_backends() -> list[str]:
    """``dgg_fused.available_backends()`` for the bench device (the device argument, where the API takes one)."""
    import dgg_fused

    try:
        return list(dgg_fused.available_backends(DEVICE))
    except TypeError:  # an API without the device argument
        return list(dgg_fused.available_backends())


def backend_unusable(backend: str) -> str | None:
    """Why the energy ``backend`` cannot be benchmarked on the bench device (None if it can)."""
    if backend not in _UNUSABLE:
        from dgg_fused.ops import grad_sumsq

        why = None
        if backend == "triton" and not IS_CUDA:
            why = "Triton kernels run on GPUs (on CPU only under TRITON_INTERPRET=1, a debugging interpreter)"
        else:
            try:
                grad_sumsq([torch.ones(8, device=DEVICE)], backend=backend)
                sync()
            except Exception as exc:  # each backend raises its own "wrong device" error
                why = f"{type(exc).__name__}: {exc}"
        _UNUSABLE[backend] = why
    return _UNUSABLE[backend]


# ---------------------------------------------------------------------------------------------------- timing


def sync() -> None:
    if IS_CUDA:
        torch.cuda.synchronize()


class DeviceTimed:
    """Wrap ``fn`` for pytest-benchmark: on CUDA, synchronize inside the timed call and also time it with CUDA
    events (``event_median_s``); on CPU, just call it."""

    def __init__(self, fn: Callable[[], object]) -> None:
        self.fn = fn
        self.event_s: list[float] = []

    def __call__(self) -> None:
        if IS_CUDA:
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            start.record()
            self.fn()
            end.record()
            end.synchronize()
            self.event_s.append(start.elapsed_time(end) / 1e3)
        else:
            self.fn()

    def reset(self) -> None:
        self.event_s.clear()

    def event_median_s(self) -> float | None:
        return statistics.median(self.event_s) if self.event_s else None


def flush_bytes() -> int:
    """Bytes the cache flush writes: ``DGG_BENCH_FLUSH_BYTES``, else 2x the last-level cache (at least 64 MiB)."""
    if SMOKE:
        return 1 << 12
    env = os.environ.get("DGG_BENCH_FLUSH_BYTES", "").strip()
    if env:
        return int(env)
    return max(64 << 20, 2 * (LLC_BYTES or (64 << 20)))


class CacheFlusher:
    """Writes a buffer twice the last-level cache, so the next timed call starts cold (as after backward)."""

    def __init__(self, nbytes: int | None = None) -> None:
        if nbytes is None:
            nbytes = flush_bytes()
        self.buf = torch.empty(nbytes, dtype=torch.uint8, device=DEVICE)
        self.nbytes = nbytes

    def __call__(self) -> None:
        self.buf.fill_(1)
        sync()


def paired_ratios(fa: Callable[[], object], fb: Callable[[], object], pairs: int, setup: Callable[[], object]) -> dict:
    """Time ``fa`` and ``fb`` alternately (ABBA order, ``setup`` before each call) and summarise ``t_b / t_a``.

    Pairs taken seconds apart see the same machine load, so their ratio is much steadier than the ratio of two
    medians measured minutes apart on a shared box. Returns the median ratio and its inter-quartile range, and
    the ratio of the two minima (contention only ever adds time, so on a loaded machine min/min estimates the
    uncontended ratio).
    """
    import time

    now = time.process_time if CLOCK == "process" else time.perf_counter
    ta, tb = [], []
    for i in range(pairs):
        order = ((fa, ta), (fb, tb)) if i % 2 == 0 else ((fb, tb), (fa, ta))
        for f, acc in order:
            setup()
            t0 = now()
            f()
            sync()
            acc.append(now() - t0)
    r = sorted(b / a for a, b in zip(ta, tb))
    q = statistics.quantiles(r, n=4) if len(r) >= 2 else [r[0]] * 3
    return {
        "paired_ratio_median": statistics.median(r),
        "paired_ratio_q1": q[0],
        "paired_ratio_q3": q[2],
        "paired_min_ratio": min(tb) / min(ta),
        "paired_pairs": pairs,
        "paired_clock": CLOCK,
        "paired_a_median_s": statistics.median(ta),
        "paired_b_median_s": statistics.median(tb),
    }


# ---------------------------------------------------------------------------------------------------- host syncs

def count_host_syncs(step: Callable[[], object], steps: int = 2) -> tuple[float, dict[str, int]]:
    """Host syncs per call of ``step`` (averaged over ``steps`` calls) and the per-event breakdown, counted by the
    detector the test suite uses (:func:`dgg_fused.testing.record_syncs`: sync ops, host copies, printing, syncs
    inside custom ops, and torch's sync debug mode on CUDA)."""
    from dgg_fused.testing import record_syncs

    with record_syncs(DEVICE) as rec:
        for _ in range(steps):
            step()
    return rec.count / steps, dict(collections.Counter(rec.events))


def count_cuda_sync_warnings(step: Callable[[], object], steps: int = 2) -> float | None:
    """On CUDA, the synchronisations torch's sync debug mode reports per call (catches syncs inside C++ too)."""
    if not IS_CUDA:
        return None
    import warnings

    sync()
    prev = torch.cuda.get_sync_debug_mode()
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            for _ in range(steps):
                step()
        finally:
            torch.cuda.set_sync_debug_mode(prev)
    sync()
    return sum("synchroniz" in str(x.message).lower() for x in w) / steps


def count_cuda_launches(step: Callable[[], object], steps: int = 5) -> dict | None:
    """Kernels and memcpy/memset operations per call of ``step``, from torch.profiler (CUDA only), and the kernel
    names with their counts per call (``names``)."""
    if not IS_CUDA:
        return None
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    step()
    sync()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            step()
        sync()
    kernels = copies = 0
    names: collections.Counter[str] = collections.Counter()
    for e in prof.events():
        if getattr(e, "device_type", None) != DeviceType.CUDA:
            continue
        name = e.name.lower()
        if name.startswith("memcpy") or name.startswith("memset"):
            copies += 1
        else:
            kernels += 1
            names[e.name[:120]] += 1
    return {"kernels": kernels / steps, "memcpy_memset": copies / steps,
            "names": {k: v / steps for k, v in sorted(names.items())}}


def added_kernel_names(ours: dict, bare: dict) -> dict[str, float]:
    """Kernels per step that ``ours`` launches beyond ``bare`` (by name; from :func:`count_cuda_launches`)."""
    a, b = ours.get("names", {}), bare.get("names", {})
    return {k: v - b.get(k, 0.0) for k, v in a.items() if v - b.get(k, 0.0) > 0}


# ---------------------------------------------------------------------------------------------------- machine

#: Nominal memory bandwidth (bytes/s) of common cards, matched against torch.cuda.get_device_name().
_NOMINAL_BW = [
    ("H200", 4.8e12),
    ("H100 NVL", 3.9e12),
    ("H100 PCIe", 2.0e12),
    ("H100", 3.35e12),  # SXM5 (HBM3), reported as "NVIDIA H100 80GB HBM3"
    ("A100-SXM4-80GB", 2.039e12),
    ("A100 80GB PCIe", 1.935e12),
    ("A100", 1.555e12),
]


def nominal_bandwidth() -> tuple[float | None, str]:
    """The card's nominal DRAM bandwidth in bytes/s and where the number came from (None off CUDA)."""
    if not IS_CUDA:
        return None, "cpu"
    name = torch.cuda.get_device_name(DEVICE)
    for key, bw in _NOMINAL_BW:
        if key in name:
            return bw, f"datasheet ({key})"
    p = torch.cuda.get_device_properties(DEVICE)
    clk, bus = getattr(p, "memory_clock_rate", 0), getattr(p, "memory_bus_width", 0)
    if clk and bus:
        return 2.0 * clk * 1e3 * bus / 8, "device properties (2 x memory clock x bus width)"
    return None, "unknown card"


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def loadavg() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def versions() -> dict[str, str | None]:
    try:
        import triton

        tv = triton.__version__
    except Exception:  # triton is optional (and absent on some CPU installs)
        tv = None
    try:
        import dgg_fused

        dv = dgg_fused.__version__
    except Exception:
        dv = None
    return {"torch": torch.__version__, "triton": tv, "dgg_fused": dv, "python": platform.python_version()}


def common_extra_info() -> dict:
    """What every benchmark records beside its timing: device, versions, threads, load, scaling mode."""
    info = {
        "device": str(DEVICE),
        "device_name": torch.cuda.get_device_name(DEVICE) if IS_CUDA else cpu_model(),
        "torch_threads": torch.get_num_threads(),
        "loadavg": loadavg(),
        "smoke": SMOKE,
        "clock": CLOCK,
        "last_level_cache_bytes": LLC_BYTES,
        "last_level_cache_source": LLC_SOURCE,
        "cache_flush_bytes": flush_bytes(),
    }
    info.update(versions())
    return info
