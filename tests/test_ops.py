"""grad_sumsq: every CPU backend against the float64 reference, the op contract, backend choice, the no-build path.

The Triton backend's CPU cases run under the interpreter in tests/test_kernels_triton.py; CUDA cases are in
tests/test_gpu_kernels.py (skipped without a GPU)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

import dgg_fused
from dgg_fused.ops import BACKENDS, available_backends, grad_sumsq, grad_sumsq_reference, resolve_backend

CPU_BACKENDS = [b for b in available_backends("cpu") if b != "triton"]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# Floor of the tolerance rule, in float32 ulps of the result: rounding the result itself costs 0.5 ulp, and torch's
# cascade sum can land within 1 ulp of the truth by luck, so "2x torch's error" alone would demand the impossible.
FLOOR_ULPS = {torch.float32: 4, torch.bfloat16: 4, torch.float16: 4}


def _ref64(ts):
    return grad_sumsq_reference(ts, out_dtype=torch.float64)


def _torch_same_dtype(ts):
    """Torch's own float32-accumulated reduction of the same inputs (what a user would write)."""
    return sum((t.float().square().sum() for t in ts), torch.zeros((), dtype=torch.float32))


def _check(ts, backend, dtype):
    ref = _ref64(ts)
    out = grad_sumsq(ts, backend=backend)
    assert out.dtype == torch.float32 and out.shape == () and out.device == ts[0].device
    err = (out.double() - ref).abs().item()
    torch_err = (_torch_same_dtype(ts).double() - ref).abs().item()
    floor = FLOOR_ULPS[dtype] * torch.finfo(torch.float32).eps * ref.abs().item()
    assert err <= 2 * torch_err + floor, (
        f"{backend}/{dtype}: |ours - fp64| = {err:.3e} > 2 x torch's {torch_err:.3e} + {floor:.3e} (ref {ref.item():.6e})"
    )
    return out


SHAPES = {"0": [0], "1": [1], "odd": [1001], "2**20+3": [2**20 + 3], "many-small": [int(i % 37) for i in range(300)],
          "several": [4096, 1, 70_000, 0, 33]}


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", list(SHAPES))
def test_matches_float64_reference(backend, dtype, shape):
    g = torch.Generator().manual_seed(hash(shape) % 1000)
    ts = [(torch.randn(n, generator=g) * 3).to(dtype) for n in SHAPES[shape]]
    _check(ts, backend, dtype)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_mixed_dtypes_and_layouts(backend):
    g = torch.Generator().manual_seed(0)
    ts = [
        torch.randn(300, 70, generator=g).t(),                     # permuted: read in place
        torch.randn(64, 65, generator=g).bfloat16()[::2, 3:],       # strided slice: copied
        torch.randn(9, generator=g).half().expand(4, 9),            # expanded (overlapping): copied
        torch.randn(3, 4, 5, generator=g).permute(2, 0, 1),
        torch.randn(0, 5).half(),
    ]
    _check(ts, backend, torch.float32)
    _check([ts[0].contiguous()], backend, torch.float32)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_bitwise_deterministic(backend):
    g = torch.Generator().manual_seed(3)
    ts = [torch.randn(2**20 + 3, generator=g).bfloat16(), torch.randn(5000, generator=g)]
    runs = [grad_sumsq(ts, backend=backend) for _ in range(3)]
    assert all(torch.equal(r, runs[0]) for r in runs)


@pytest.mark.skipif("cpp" not in CPU_BACKENDS, reason="dgg_fused._C not built")
def test_cpp_independent_of_thread_count():
    ts = [torch.randn(2**19 + 17).bfloat16(), torch.randn(3 * 2**16 + 5)]
    old = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = grad_sumsq(ts, backend="cpp")
        torch.set_num_threads(2)
        two = grad_sumsq(ts, backend="cpp")
    finally:
        torch.set_num_threads(old)
    assert torch.equal(one, two)


@pytest.mark.skipif("cpp" not in CPU_BACKENDS, reason="dgg_fused._C not built")
def test_cpp_large_values_and_nonfinite():
    big = torch.full((1000,), 3e18)  # squares overflow float32 per element? 9e36 < 3.4e38: the sum overflows to inf
    assert torch.isinf(grad_sumsq([big], backend="cpp"))
    assert torch.isnan(grad_sumsq([torch.tensor([1.0, float("nan")])], backend="cpp"))
    assert torch.isinf(grad_sumsq([torch.tensor([1.0, float("inf")]).bfloat16()], backend="cpp"))


@pytest.mark.skipif("cpp" not in CPU_BACKENDS, reason="dgg_fused._C not built")
def test_opcheck():
    from dgg_fused.ops import kernel

    kernel("cpp")  # registers the compiled op's fake
    for ts in ([torch.randn(33)], [torch.randn(4, 5).bfloat16(), torch.randn(0)], [torch.randn(7).half()]):
        torch.library.opcheck(torch.ops.dgg_fused._C_sumsq.default, (ts,))


def test_one_schema_per_op_and_no_backend_argument():
    """Each sum-of-squares op takes only tensors: the backend is chosen before an op is called, never inside one."""
    import dgg_fused.ops  # noqa: F401  (defines the Triton ops)

    for name in ("sumsq_triton", "sumsq_partials_triton") + (("_C_sumsq",) if "cpp" in CPU_BACKENDS else ()):
        schema = getattr(torch.ops.dgg_fused, name).default._schema
        assert [a.name for a in schema.arguments] == ["tensors"], schema
    assert not hasattr(torch.ops.dgg_fused, "grad_sumsq")


@pytest.mark.parametrize("backend", ["auto"] + CPU_BACKENDS)
def test_under_torch_compile(backend):
    ts = [torch.randn(100), torch.randn(7, 3)]

    @torch.compile(backend="eager", fullgraph=True)
    def f(a, b):
        return grad_sumsq([a * 2, b], backend=backend)

    torch.testing.assert_close(f(*ts), grad_sumsq([ts[0] * 2, ts[1]]), rtol=1e-6, atol=0)


def test_backend_choice():
    cpu = torch.device("cpu")
    assert resolve_backend("auto", cpu, [torch.float32]) == CPU_BACKENDS[0]
    assert resolve_backend("auto", cpu, [torch.float64]) == "torch"  # dtypes the kernels do not take
    assert set(available_backends()) <= set(BACKENDS) and "torch" in available_backends()
    assert dgg_fused.available_backends is available_backends
    with pytest.raises(RuntimeError, match="not available"):
        grad_sumsq([torch.ones(3)], backend="cuda")
    with pytest.raises(ValueError, match="unknown backend"):
        grad_sumsq([torch.ones(3)], backend="fastest")
    if "triton" not in available_backends("cpu"):
        with pytest.raises(RuntimeError, match="not available"):
            grad_sumsq([torch.ones(3)], backend="triton")
    if "cpp" in CPU_BACKENDS:
        with pytest.raises(TypeError, match="float32/bfloat16/float16"):
            grad_sumsq([torch.ones(3, dtype=torch.float64)], backend="cpp")


def test_bad_inputs():
    with pytest.raises(ValueError):
        grad_sumsq([])
    with pytest.raises(TypeError):
        grad_sumsq([torch.ones(3, dtype=torch.int64)])
    with pytest.raises(TypeError):
        grad_sumsq([torch.ones(3).to_sparse()])
    assert grad_sumsq(torch.ones(4)).item() == 4.0  # a single tensor is accepted too


def test_float64_falls_back_to_reference():
    t = torch.randn(1000, dtype=torch.float64)
    torch.testing.assert_close(grad_sumsq([t]).double(), t.square().sum(), rtol=1e-7, atol=0)


_NO_BUILD = r"""
import builtins, warnings, sys
real_import = builtins.__import__
def fake_import(name, globals=None, locals=None, fromlist=(), level=0):
    if name == "dgg_fused._C" or (name == "dgg_fused" and fromlist and "_C" in fromlist):
        raise ImportError("simulated: extension not built")
    return real_import(name, globals, locals, fromlist, level)
builtins.__import__ = fake_import
import importlib
orig = importlib.import_module
def fake_import_module(name, package=None):
    if name == "dgg_fused._C":
        raise ImportError("simulated: extension not built")
    return orig(name, package)
importlib.import_module = fake_import_module
with warnings.catch_warnings(record=True) as w:
    warnings.simplefilter("always")
    import torch, dgg_fused
    from dgg_fused.ops import available_backends, grad_sumsq
    assert available_backends("cpu") == ["torch"], available_backends("cpu")
    e = grad_sumsq([torch.ones(5)])
    assert e.item() == 5.0
    grad_sumsq([torch.ones(5)])
    try:
        grad_sumsq([torch.ones(5)], backend="cpp")
    except RuntimeError as exc:
        assert "simulated" in str(exc), exc
    else:
        raise AssertionError("explicit cpp backend did not raise")
msgs = [str(x.message) for x in w if "dgg_fused._C" in str(x.message)]
assert len(msgs) == 1, msgs
print("OK")
"""


def test_import_without_build_falls_back_and_warns_once():
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run([sys.executable, "-c", _NO_BUILD], cwd=root, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0 and "OK" in proc.stdout, proc.stdout + proc.stderr[-4000:]


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("DGG_RUN_SLOW") != "1", reason="a 4.3 GB bf16 tensor: DGG_RUN_SLOW=1")
@pytest.mark.skipif("cpp" not in CPU_BACKENDS, reason="dgg_fused._C not built")
def test_cpp_more_than_2_31_elements():
    n = 2**31 + 2**20 + 5
    x = torch.full((n,), 0.5, dtype=torch.bfloat16)
    x[2**31 :] = 4.0  # the elements past 2**31 weigh 16.8M in the sum: a 32-bit offset would miss or misplace them
    exact = 2**31 * 0.25 + (n - 2**31) * 16.0  # every block and chunk sum is exact; only the final rounding is not
    assert grad_sumsq([x], backend="cpp").item() == torch.tensor(exact, dtype=torch.float64).float().item()


def test_partials_path_only_for_triton():
    from dgg_fused.ops import kernel

    for backend in ("cpp", "cuda", "torch"):  # partial sums come from the Triton stage 1 only
        with pytest.raises(ValueError, match="Triton stage 1"):
            kernel(backend, partials=True)
