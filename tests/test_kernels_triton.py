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


def _compile_sm90(fn, signature, constexprs, num_warps, what="ptx"):
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    import triton

    src = ASTSource(fn=fn, signature=signature, constexprs=constexprs)
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": num_warps}).asm[what]


def _registers(cubin: bytes) -> tuple[int, int]:
    """(registers per thread, static shared bytes) of the one kernel in ``cubin``, from cuobjdump (bundled with triton)."""
    import re
    import tempfile

    import triton

    tool = triton.knobs.nvidia.cuobjdump.path
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([tool, "--dump-resource-usage", f.name], capture_output=True, text=True, check=True).stdout
    return int(re.search(r"REG:(\d+)", out).group(1)), int(re.search(r"SHARED:(\d+)", out).group(1))


def test_plan_and_one_wave_grid():
    """The tiles depend on the element counts only; the grid is one wave of resident programs; on a 7B lm_head
    each program gets many tiles, so the uneven last round is a small part of the work."""
    from dgg_fused.ops import triton_sumsq as ts

    tiles, span, starts = ts.plan([152064 * 3584])
    assert tiles <= ts.MAX_TILES and span % (ts.UNROLL * ts.SUB) == 0 and tiles * span >= 152064 * 3584 > (tiles - 1) * span
    h100 = ts.resident_programs(34, 1024, 8, sms=132)
    assert h100 == 132 * 6  # 34 regs -> 1280 per warp, 10240 per 8-warp block -> 6 blocks per SM
    assert tiles / h100 >= 16  # last round <= 1/16 of a program's work
    assert ts.resident_programs(255, 0, 8, sms=1) == 1 and ts.resident_programs(16, 0, 1, sms=2) == 64  # regs / block caps
    assert ts.plan([1, 2048, 2049]) == (1, 8192, [0, 2048, 4096])
    assert ts.partials_block(1) == 16 and ts.partials_block(1025) == 1024


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") == "1", reason="compiles the non-interpreted kernels")
def test_triton_kernels_compile_for_sm90():
    """No GPU needed: lower every Triton kernel for sm_90 (the CUDA analogue of CI compiling csrc/cuda), and check
    the properties the design relies on: 16-byte vector loads when aligned, 4 x 16 B in flight per thread, the
    registers (hence one-wave grid and bytes in flight per SM) of stage 1, IEEE division/sqrt in the gate."""
    import re

    from dgg_fused.gate import _triton as te
    from dgg_fused.ops import triton_sumsq as ts

    sig = {"addr_ptr": "*i64", "layout_ptr": "*i64", "n_tensors": "i32", "n_tiles": "i32", "span": "i64",
           "partials_ptr": "*fp32", "SUB": "constexpr", "UNROLL": "constexpr", "ALIGNED": "constexpr"}
    for aligned in (True, False):
        consts = {"SUB": ts.SUB, "UNROLL": ts.UNROLL, "ALIGNED": aligned}
        ptx = _compile_sm90(ts._sumsq_partials_kernel, sig, consts, ts.NUM_WARPS)
        assert ("ld.global.v4.b32" in ptx) == aligned, sorted(set(re.findall(r"ld\.global[.\w]*", ptx)))
        if aligned:
            # the unrolled group: 4 vector loads per 2-byte dtype and 8 for fp32 (+1 each for the single sub-block)
            assert ptx.count("ld.global.v4.b32") == (4 + 1) * 2 + (8 + 2), ptx.count("ld.global.v4.b32")
            regs, shared = _registers(_compile_sm90(ts._sumsq_partials_kernel, sig, consts, ts.NUM_WARPS, "cubin"))
            slots = ts.resident_programs(regs, shared, ts.NUM_WARPS, sms=132)  # H100 / H200 SXM: 132 SMs
            blocks_per_sm = slots // 132
            # >= 4 resident blocks per SM; with 4 x 16 B per thread in flight that is >= 64 KiB per SM for bf16,
            # above the ~25 KiB an H200 needs (4.8 TB/s x ~700 ns / 132 SMs)
            assert blocks_per_sm >= 4, (regs, shared, blocks_per_sm)
            assert blocks_per_sm * 32 * ts.NUM_WARPS * 4 * 16 >= 64 * 1024
    _compile_sm90(ts._sumsq_finalize_kernel, {"partials_ptr": "*fp32", "n": "i32", "out_ptr": "*fp32", "PB": "constexpr"},
                  {"PB": 1024}, 4)
    sig = {"partials_ptr": "*fp32", "n_partials": "i32", "scale_ptr": "*fp32", "ext_ptr": "*fp32", "window_ptr": "*fp32",
           "W": "i32", "filled_ptr": "*i64", "prev_ptr": "*fp32", "k_ptr": "*i64", "stopped_ptr": "*i8",
           "counters_ptr": "*i64", "last_ptr": "*fp32", "skip_ptr": "*fp32", "tau": "fp32", "std_floor": "fp32",
           **{k: "constexpr" for k in ("STAT", "REF", "HAS_SCALE", "HAS_EXT", "PB", "WP", "TINY")}}
    for stat, ref, wp, warps in ((2, 1, 16, 1), (1, 0, 1024, 4)):
        ptx = _compile_sm90(te._gate_epilogue_kernel, sig, {"STAT": stat, "REF": ref, "HAS_SCALE": True, "HAS_EXT": True,
                                                            "PB": 1024, "WP": wp, "TINY": te._TINY}, warps)
        assert "div.rn.f32" in ptx and "sqrt.rn.f32" in ptx and ".approx" not in ptx


def test_grid_from_the_compiled_kernel(monkeypatch):
    """The host logic that sizes the CUDA grid, without a GPU: a compiled kernel's registers / shared memory / warps
    and the device's SM count give one wave of resident programs; before the first launch, 4 per SM."""
    from types import SimpleNamespace

    import torch

    from dgg_fused.ops import triton_sumsq as ts

    props = SimpleNamespace(multi_processor_count=132, regs_per_multiprocessor=65536,
                            max_threads_per_multi_processor=2048, shared_memory_per_multiprocessor=233472)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device=None: props)
    monkeypatch.setattr(ts, "_SLOTS", {})
    dev = torch.device("cuda", 0)
    assert ts._grid(13306, dev, True, None) == 4 * 132  # registers not known yet
    kernel = SimpleNamespace(_init_handles=lambda: None, n_regs=34,
                             metadata=SimpleNamespace(shared=1024, num_warps=8))
    ts._learn_slots(kernel, dev, True)
    assert ts._SLOTS[(0, True)] == 6 * 132
    assert ts._grid(13306, dev, True, None) == 792 and ts._grid(100, dev, True, None) == 100
    assert ts._grid(13306, dev, True, 7) == 7 and ts._grid(5, dev, True, 7) == 5
    assert ts._grid(13306, dev, False, None) == 4 * 132  # the unaligned variant is another compiled kernel
    ts._learn_slots(SimpleNamespace(), torch.device("cuda", 1), True)  # an unexpected kernel object: 4 per SM
    assert ts._SLOTS[(1, True)] == 4 * 132
