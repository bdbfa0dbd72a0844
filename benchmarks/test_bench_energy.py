"""Energy-op bandwidth: ``dgg_fused.ops.grad_sumsq`` per backend and dtype vs torch's norms and the read roofline.

One group per (lm_head shape, dtype). In every group:

* ``roofline``: the read roofline, a plain ``sum()`` over the very same bytes reinterpreted as float32 (torch's
  vectorised, multi-threaded fp32 reduction: a pure streaming read), measured in the same run. Every other method
  is also timed *paired* with it (the two alternate, so both see the same load); the report's "% of roofline"
  is that paired ratio.
* ``ours[<backend>]``: ``grad_sumsq([g], backend=...)`` for each of ``dgg_fused.available_backends()``.
* ``kernel[<backend>]``: the compiled kernel alone, without the public op's Python layers (validation, backend
  choice, custom-op dispatch): ``torch.ops.dgg_fused._C_sumsq([g])`` for ``cpp``/``cuda``,
  ``triton_sumsq.sumsq([g])`` for ``triton``. The energy-op bandwidth target is judged on these rows.
* ``vector_norm``: ``torch.linalg.vector_norm(g, dtype=torch.float32)``.
* ``_foreach_norm``: ``torch._foreach_norm([g])`` (returns the input dtype: a bf16/fp16 norm).
* ``get_total_norm``: ``torch.nn.utils.get_total_norm([g])`` (what ``clip_grad_norm_`` uses; input dtype too).
* ``naive``: ``g.float().pow(2).sum()``, the energy a user would write.

GB/s counts the bytes of ``g`` read once. Run: ``pytest benchmarks/ --benchmark-only`` (see docs/benchmarks.md).
"""

from __future__ import annotations

import functools
import os
import time

import pytest
import torch

from dgg_fused.ops import grad_sumsq

from _common import (
    DEVICE,
    DTYPES,
    IS_CUDA,
    LM_HEADS,
    DeviceTimed,
    SMOKE,
    as_fp32_bytes,
    backend_unusable,
    energy_backends,
    common_extra_info,
    lm_head_shape,
    make_grad,
    nominal_bandwidth,
    paired_ratios,
    sync,
)

BACKENDS = energy_backends()

BASELINES = {
    "vector_norm": lambda g: torch.linalg.vector_norm(g, dtype=torch.float32),
    "_foreach_norm": lambda g: torch._foreach_norm([g])[0],
    "get_total_norm": lambda g: torch.nn.utils.get_total_norm([g]),
    "naive": lambda g: g.float().pow(2).sum(),
}

#: Seconds spent on the paired roofline comparison of one method (3 to 60 pairs within this budget).
PAIR_BUDGET_S = float(os.environ.get("DGG_BENCH_ENERGY_PAIR_BUDGET_S", "3"))

KERNELS = [b for b in BACKENDS if b != "torch"]
METHODS = ["roofline"] + [f"ours[{b}]" for b in BACKENDS] + [f"kernel[{b}]" for b in KERNELS] + list(BASELINES)

# One flat parametrization in the order we want to run: all methods of one (shape, dtype) back to back, so the
# gradient is built once per group (cache of one, below) and the roofline is measured next to its rivals.
CASES = [(m, d, meth) for m in LM_HEADS for d in DTYPES for meth in METHODS]


@functools.lru_cache(maxsize=1)
def _grad(model: str, dtype_name: str) -> torch.Tensor:
    shape, _ = lm_head_shape(model)
    return make_grad(shape, DTYPES[dtype_name])


def _fn(method: str, g: torch.Tensor):
    if method == "roofline":
        flat = as_fp32_bytes(g)
        return lambda: flat.sum()
    if method.startswith("ours["):
        backend = method[len("ours[") : -1]
        return lambda: grad_sumsq([g], backend=backend)
    if method.startswith("kernel["):
        backend = method[len("kernel[") : -1]
        if backend == "triton":
            from dgg_fused.ops import triton_sumsq

            return lambda: triton_sumsq.sumsq([g])
        op = torch.ops.dgg_fused._C_sumsq
        return lambda: op([g])
    f = BASELINES[method]
    return lambda: f(g)


@pytest.mark.parametrize(("model", "dtype_name", "method"), CASES, ids=[f"{m}-{d}-{x}" for m, d, x in CASES])
def test_energy_bandwidth(benchmark, model: str, dtype_name: str, method: str) -> None:
    if method.startswith(("ours[", "kernel[")):
        why = backend_unusable(method[method.index("[") + 1 : -1])
        if why:
            pytest.skip(f"{method} cannot run on {DEVICE}: {why}")
    g = _grad(model, dtype_name)
    shape, scaling = lm_head_shape(model)
    fn = _fn(method, g)
    out = fn()  # warm-up (allocator, lazy init, extension load), outside the timing
    t0 = time.perf_counter()
    out = fn()
    sync()
    t_one = time.perf_counter() - t0
    timed = DeviceTimed(fn)
    benchmark.group = f"energy {model} {tuple(shape)} {dtype_name}"
    bw, bw_src = nominal_bandwidth()
    benchmark.extra_info.update(common_extra_info())
    benchmark.extra_info.update(
        suite="energy",
        model=model,
        shape=list(shape),
        full_shape=list(LM_HEADS[model]),
        scaling=scaling,
        dtype=dtype_name,
        method=method,
        role="roofline" if method == "roofline" else ("ours" if method.startswith(("ours[", "kernel[")) else "baseline"),
        bytes=g.numel() * g.element_size(),
        result_dtype=str(out.dtype).replace("torch.", ""),
        nominal_bandwidth=bw,
        nominal_bandwidth_source=bw_src,
    )
    if method != "roofline":
        # The same-run roofline, paired: roofline and method alternate, so both see the same machine load.
        roof = _fn("roofline", g)
        pairs = 1 if SMOKE else max(3, min(60, int(PAIR_BUDGET_S / max(2 * t_one, 1e-6))))
        p = paired_ratios(roof, fn, pairs, setup=lambda: None)
        benchmark.extra_info.update(
            p, paired_roofline_frac=1.0 / p["paired_ratio_median"], min_roofline_frac=1.0 / p["paired_min_ratio"]
        )
    benchmark(timed)
    if IS_CUDA:
        benchmark.extra_info["event_median_s"] = timed.event_median_s()
