"""Portable numerics: the CPU code paths every testbed run takes, pinned so that its numbers do not depend on the CPU.

Floating-point results of the same program differ between CPUs when libraries pick kernels by the instruction set
they find: ATen dispatches its vectorised kernels to AVX-512 or AVX2, oneMKL picks a GEMM code path per vendor and
ISA (on AMD its AVX2 "CNR branch" is not even available: it silently falls back to AUTO), and oneDNN JIT-compiles
for the widest ISA. A testbed run therefore executes in a spawned worker process whose environment pins them
(:data:`PINNED_ENV`), whatever the caller's environment:

* ``ATEN_CPU_CAPABILITY=avx2`` — ATen's AVX2 kernels (the same compiled code on every x86-64 CPU with AVX2; Sleef
  for the vectorised transcendental functions);
* ``MKL_CBWR=COMPATIBLE`` — oneMKL's conditional-numerical-reproducibility branch for "Intel and compatible"
  processors (SSE2 without the approximate rcpps/rsqrtps, fixed cache sizes, deterministic reductions). Intel's
  documentation says that branches other than AUTO and COMPATIBLE are available only on Intel processors, so
  COMPATIBLE is the only branch that is the same on Intel and AMD; it costs about 2x in fp32 GEMM;
* ``ONEDNN_MAX_CPU_ISA=AVX2`` — caps oneDNN (a run of the toy policy executes no oneDNN primitive; the cap is
  there for any path that would);
* ``DGG_FUSED_CPU_ISA=avx2`` — our own sum-of-squares kernel (its AVX-512 path gives the same bits anyway);
* one intra-op thread (``torch.set_num_threads(1)``, ``OMP_NUM_THREADS=1``, ``MKL_NUM_THREADS=1``).

The worker checks that the pins took effect (:func:`check`): ATen reports AVX2, oneMKL reports the COMPATIBLE
branch. A CPU without AVX2 (ATen would fall back to its scalar kernels silently) fails the check with a clear
error instead of producing other numbers. :func:`current` names the mode a process actually runs in; the
warm-start cache key includes it, so a warm start trained in another mode (an in-process test run, say) is never
mistaken for a pinned one.

The pins are set in the parent's ``os.environ`` only while the worker processes are started
(:func:`pinned_environ`): ATen, oneMKL and oneDNN read them once, when they initialise, which in a spawned child
happens after they are set; the parent's own libraries are long initialised and are not affected.
``DGG_FUSED_CPU_ISA`` and the thread count, which are read on every call, are set in the worker itself.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import platform
from typing import Iterator

__all__ = ["MODE", "PINNED_ENV", "pinned_environ", "init_worker", "check", "current", "describe"]

#: The name of the pinned mode (part of every warm-start cache key and run record).
MODE = "portable-avx2-mklcompat-v1"

#: Read by the libraries once, at their initialisation: set before a worker process starts.
_INIT_ENV = {
    "ATEN_CPU_CAPABILITY": "avx2",
    "MKL_CBWR": "COMPATIBLE",
    "ONEDNN_MAX_CPU_ISA": "AVX2",
    "OMP_NUM_THREADS": "1",
    "MKL_NUM_THREADS": "1",
}
#: Read on every call: set inside the worker.
_CALL_ENV = {"DGG_FUSED_CPU_ISA": "avx2"}
#: Every variable the pinned mode sets.
PINNED_ENV = {**_INIT_ENV, **_CALL_ENV}

_MKL_CBWR_COMPATIBLE = 3  # oneMKL's MKL_CBWR_COMPATIBLE
_MKL_CBWR_BRANCH = 1  # mkl_cbwr_get(MKL_CBWR_BRANCH): the branch only, without the STRICT flag


@contextlib.contextmanager
def pinned_environ() -> Iterator[None]:
    """Set the init-time pins in ``os.environ`` for processes started inside the block; restore afterwards."""
    saved = {k: os.environ.get(k) for k in _INIT_ENV}
    os.environ.update(_INIT_ENV)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _mkl_branch() -> int | None:
    """oneMKL's current CNR branch (``mkl_cbwr_get``), or None where torch's oneMKL does not export it."""
    import torch

    path = os.path.join(os.path.dirname(torch.__file__), "lib", "libtorch_cpu.so")
    try:
        fn = ctypes.CDLL(path).mkl_serv_cbwr_get
    except (OSError, AttributeError):
        return None
    fn.restype, fn.argtypes = ctypes.c_int, [ctypes.c_int]
    return int(fn(_MKL_CBWR_BRANCH))


def _mkl_auto_branch() -> int | None:
    """The CNR branch oneMKL's AUTO would pick on this CPU (2 = AUTO itself, e.g. on AMD), or None."""
    import torch

    path = os.path.join(os.path.dirname(torch.__file__), "lib", "libtorch_cpu.so")
    try:
        fn = ctypes.CDLL(path).mkl_serv_cbwr_get_auto_branch
    except (OSError, AttributeError):
        return None
    fn.restype, fn.argtypes = ctypes.c_int, []
    return int(fn())


def _problems() -> list[str]:
    import torch

    out = []
    cap = torch.backends.cpu.get_cpu_capability()
    if cap != "AVX2":
        out.append(f"ATen runs its {cap} kernels, not AVX2 (ATEN_CPU_CAPABILITY="
                   f"{os.environ.get('ATEN_CPU_CAPABILITY')!r}; a CPU without AVX2, or torch imported before it was set)")
    if torch.backends.mkl.is_available():
        branch = _mkl_branch()
        if branch is not None and branch != _MKL_CBWR_COMPATIBLE:
            out.append(f"oneMKL's reproducibility branch is {branch}, not COMPATIBLE ({_MKL_CBWR_COMPATIBLE}); "
                       f"MKL_CBWR={os.environ.get('MKL_CBWR')!r}")
    for k, v in _CALL_ENV.items():
        if os.environ.get(k) != v:
            out.append(f"{k}={os.environ.get(k)!r}, not {v!r}")
    if torch.get_num_threads() != 1:
        out.append(f"{torch.get_num_threads()} intra-op threads, not 1")
    return out


def check() -> None:
    """Raise ``RuntimeError`` unless this process runs in the pinned mode (called by every worker at start)."""
    bad = _problems()
    if bad:
        raise RuntimeError("dgg_fused.demo: this worker does not run with portable numerics, so its numbers would "
                           "depend on the CPU: " + "; ".join(bad))


def init_worker() -> None:
    """Initialiser of every testbed worker process: the per-call pins, one thread, then :func:`check`."""
    import torch

    os.environ.update(_CALL_ENV)
    torch.set_num_threads(1)
    check()


def current() -> str:
    """The numerics mode this process runs in: :data:`MODE` when pinned, else a description of the native paths
    (e.g. ``native:AVX512:mkl-branch-1:isa-auto``), so results of different modes are never mixed."""
    import torch

    if not _problems():
        return MODE
    return (f"native:{torch.backends.cpu.get_cpu_capability()}:mkl-branch-{_mkl_branch()}:"
            f"isa-{os.environ.get('DGG_FUSED_CPU_ISA', 'auto')}")


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def describe() -> dict:
    """What a results file records about the numerics: the mode and the machine it ran on."""
    import torch

    return {"mode": MODE, "env": dict(PINNED_ENV), "cpu": _cpu_model(), "machine": platform.machine(),
            "torch": torch.__version__, "mkl_auto_branch_here": _mkl_auto_branch()}
