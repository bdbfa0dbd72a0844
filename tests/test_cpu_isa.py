"""The C++ CPU energy kernel's instruction-set paths (csrc/sumsq_avx512.cpp, csrc/dgg_fused.cpp).

AVX-512 and AVX2 keep the same 32 float32 lanes, one FMA per element in the same per-lane order, and the same
reduction tree, so they must agree bit for bit; the portable path is a different (non-FMA) order and only has to
be accurate. ``DGG_FUSED_CPU_ISA`` (read on every call) picks a path; unset = the best the CPU supports."""

from __future__ import annotations

import pytest
import torch

from dgg_fused.ops import available_backends, grad_sumsq

pytestmark = pytest.mark.skipif("cpp" not in available_backends("cpu"), reason="dgg_fused._C not built")


def _flags() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return f.read()
    except OSError:
        return ""


HAS_AVX2 = " avx2" in _flags() and " fma" in _flags() and " f16c" in _flags()
HAS_AVX512 = HAS_AVX2 and " avx512f" in _flags()
ISAS = ["portable"] + (["avx2"] if HAS_AVX2 else []) + (["avx512"] if HAS_AVX512 else [])


def _inputs(dtype):
    g = torch.Generator().manual_seed(7)
    # block (1024) and chunk (65536) edges, a scalar tail, several tensors in one call, a permuted (in place) view
    sizes = [1, 31, 32, 33, 1023, 1024, 1057, 65535, 65536, 65537, 3 * 65536 + 1000 + 5]
    ts = [(torch.randn(n, generator=g) * 3).to(dtype) for n in sizes]
    return ts + [torch.randn(300, 77, generator=g).to(dtype).t()]


def _ref64(ts):
    return sum((t.double().square().sum() for t in ts), torch.zeros((), dtype=torch.float64))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_every_isa_path_is_accurate_and_deterministic(monkeypatch, dtype):
    ts = _inputs(dtype)
    ref = _ref64(ts)
    for isa in ISAS:
        monkeypatch.setenv("DGG_FUSED_CPU_ISA", isa)
        out = grad_sumsq(ts, backend="cpp")
        # float32 lanes, double block/chunk sums: a few float32 ulps at most at these sizes
        torch.testing.assert_close(out.double(), ref, rtol=4 * torch.finfo(torch.float32).eps, atol=0, msg=isa)
        old = torch.get_num_threads()
        try:
            for threads in (1, 2):
                torch.set_num_threads(threads)
                assert torch.equal(grad_sumsq(ts, backend="cpp"), out), (isa, threads)
        finally:
            torch.set_num_threads(old)


@pytest.mark.skipif(not HAS_AVX512, reason="this CPU has no AVX-512")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_avx512_is_bitwise_identical_to_avx2(monkeypatch, dtype):
    g = torch.Generator().manual_seed(3)
    cases = [[t] for t in _inputs(dtype)]
    big = torch.randn(2**20 + 77, generator=g)
    cases += [
        [(big * 1e-3).to(dtype)],
        [torch.full((4099,), 6e4 if dtype == torch.float16 else 3e19).to(dtype)],  # large terms, overflow to inf
        [torch.tensor([float("nan"), 1.0] * 40).to(dtype)],
        [torch.tensor([float("inf"), -2.0] * 40).to(dtype)],
        [torch.rand(5000, generator=g).to(dtype) * 1e-20],  # float32 underflow of the squares
    ]
    for ts in cases:
        out = {}
        for isa in ("avx2", "avx512"):
            monkeypatch.setenv("DGG_FUSED_CPU_ISA", isa)
            out[isa] = grad_sumsq(ts, backend="cpp")
        a, b = out["avx2"].view(torch.int32), out["avx512"].view(torch.int32)
        assert torch.equal(a, b), (ts[0].shape, out)


def test_isa_override_errors(monkeypatch):
    monkeypatch.setenv("DGG_FUSED_CPU_ISA", "sse9")
    with pytest.raises(RuntimeError, match="DGG_FUSED_CPU_ISA must be"):
        grad_sumsq([torch.ones(3)], backend="cpp")
    if not HAS_AVX512:
        monkeypatch.setenv("DGG_FUSED_CPU_ISA", "avx512")
        with pytest.raises(RuntimeError, match="does not support"):
            grad_sumsq([torch.ones(3)], backend="cpp")
    monkeypatch.setenv("DGG_FUSED_CPU_ISA", "auto")
    assert grad_sumsq([torch.ones(3)], backend="cpp").item() == 3.0
