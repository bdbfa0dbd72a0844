"""Runs the Triton kernels' CPU tests (tests/test_kernels_triton_interpreted.py) under the Triton interpreter.

TRITON_INTERPRET=1 has to be set before triton is first imported (triton.jit and triton's own library read it
then), and other test modules import triton normally (torch.compile), so the cases run in a child pytest."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))

pytest.importorskip("triton")


def test_triton_kernels_under_interpreter():
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=os.pathsep.join([HERE, os.path.dirname(HERE)]))
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-x", os.path.join(HERE, "test_kernels_triton_interpreted.py")],
        cwd=os.path.dirname(HERE),
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    tail = (proc.stdout + proc.stderr)[-6000:]
    assert proc.returncode == 0, f"Triton interpreter cases failed:\n{tail}"
    assert " passed" in proc.stdout and "skipped" not in proc.stdout, tail


def _compile_sm90(fn, signature, constexprs, num_warps):
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    import triton

    src = ASTSource(fn=fn, signature=signature, constexprs=constexprs)
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": num_warps}).asm["ptx"]


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") == "1", reason="compiles the non-interpreted kernels")
def test_triton_kernels_compile_for_sm90():
    """No GPU needed: lower every Triton kernel to PTX for sm_90 (the CUDA analogue of CI compiling csrc/cuda), and
    check the properties the design relies on: 16-byte vector loads when aligned, IEEE division/sqrt in the gate."""
    import re

    from dgg_fused.gate import _triton as te
    from dgg_fused.ops import triton_sumsq as ts

    sig = {"table_ptr": "*i64", "n_tensors": "i32", "span": "i64", "partials_ptr": "*fp32", "BLOCK": "constexpr",
           "ALIGNED": "constexpr"}
    for aligned in (True, False):
        ptx = _compile_sm90(ts._sumsq_partials_kernel, sig, {"BLOCK": ts.BLOCK, "ALIGNED": aligned}, 8)
        assert ("ld.global.v4.b32" in ptx) == aligned, sorted(set(re.findall(r"ld\.global[.\w]*", ptx)))
    _compile_sm90(ts._sumsq_finalize_kernel, {"partials_ptr": "*fp32", "n": "i32", "out_ptr": "*fp32", "PB": "constexpr"},
                  {"PB": 1024}, 4)
    sig = {"partials_ptr": "*fp32", "n_partials": "i32", "scale_ptr": "*fp32", "ext_ptr": "*fp32", "window_ptr": "*fp32",
           "W": "i32", "filled_ptr": "*i64", "prev_ptr": "*fp32", "k_ptr": "*i64", "stopped_ptr": "*i8",
           "counters_ptr": "*i64", "last_ptr": "*fp32", "skip_ptr": "*fp32", "tau": "fp32", "std_floor": "fp32",
           **{k: "constexpr" for k in ("STAT", "REF", "HAS_SCALE", "HAS_EXT", "PB", "WP", "TINY")}}
    for stat, ref, wp, warps in ((2, 1, 16, 1), (1, 0, 1024, 4)):
        ptx = _compile_sm90(te._gate_epilogue_kernel, sig, {"STAT": stat, "REF": ref, "HAS_SCALE": True, "HAS_EXT": True,
                                                            "PB": 16, "WP": wp, "TINY": te._TINY}, warps)
        assert "div.rn.f32" in ptx and "sqrt.rn.f32" in ptx and ".approx" not in ptx
