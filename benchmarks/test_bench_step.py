"""Gate overhead per optimizer step: GatedOptimizer(AdamW(fused=True)) vs bare fused AdamW vs the naive gate.

Parameter sets shaped like a decoder (28 layers of 7 matrices and 2 norm vectors, then the lm_head) with the
lm_head at ~8% of the parameters (as in Qwen2.5-7B: 545M of 7.6B) and at 50%. fp32 parameters and gradients
(the master copy of mixed-precision training). One group per (set, clipping):

* ``bare``: ``AdamW(fused=True).step()`` (with clipping: ``clip_grad_norm_(foreach=True)`` first).
* ``read``: the lm_head gradient read alone (the compiled energy kernel ``torch.ops.dgg_fused._C_sumsq``, called
  directly), then the bare step: the bytes any gate must add.
* ``floor``: the cheapest sync-free gate: that read, one compare on the device (``torch.gt(e, thr, out=found_inf)``)
  and the bare step with ``found_inf`` (torch's fused AdamW then rolls back its step counters on the device, the
  protocol GatedOptimizer uses). The CPU target is judged against it: gated <= max(1.5 x floor, floor + 1 point).
* ``ours[<backend>]``: ``GatedOptimizer(AdamW(fused=True), backend=...)`` on a reuse pass (k = 2) with a full
  window, i.e. the gate fully active and not tripping (the timed step is applied). With clipping:
  ``GatedOptimizer(..., max_grad_norm=...)`` when the constructor offers it, else skipped.
* ``naive``: the fair naive gate, ``n = torch.linalg.vector_norm(lm_head.grad); if n.item() > thr: skip`` before
  the bare step (``vector_norm`` reads in place; ``.float().pow(2).sum()`` would materialise a copy).

No gate may trip while it is timed (a skipped step costs almost nothing and would report a negative overhead):
GatedOptimizer's ``gated_steps``/``stopped_batches`` counters are checked after timing, and the floor's and the
naive gate's thresholds are never exceeded; a trip fails the benchmark.

Every timed call starts cold (an untimed write of a buffer larger than the last-level cache), as after backward.
Beside pytest-benchmark's own timing, each gated/naive benchmark records a *paired* ratio against bare: the two
steps alternate (ABBA) on the same parameters, which cancels most of the load drift of a shared machine.

The ideal overhead is the bytes the gate must add (one read of the lm_head gradient) over the bytes the bare
step moves (fused AdamW: read p, g, m, v and write p, m, v = 28 B/param in fp32; clipping adds a read of every
gradient for the norm and a read+write to scale it = 12 B/param).

On CUDA a ``pipeline`` group also times a loop of steps with queued work (a stand-in backward of matmuls and many
small kernels), where the naive gate's ``.item()`` drains the queue every step.
"""

from __future__ import annotations

import inspect
import os
import time

import pytest
import torch
from torch import nn

from dgg_fused import GateConfig, GatedOptimizer

from _common import (
    DEVICE,
    IS_CUDA,
    NO_CUDA_REASON,
    SMOKE,
    CacheFlusher,
    DeviceTimed,
    backend_unusable,
    energy_backends,
    common_extra_info,
    count_cuda_launches,
    count_cuda_sync_warnings,
    count_host_syncs,
    added_kernel_names,
    paired_ratios,
    sync,
)

BACKENDS = energy_backends()
HAS_MAX_GRAD_NORM = "max_grad_norm" in inspect.signature(GatedOptimizer.__init__).parameters
NO_MAX_GRAD_NORM = "GatedOptimizer has no max_grad_norm= option in this checkout (kernels issue not landed)"

DEFAULT_PARAMS = 2**14 if SMOKE else (2**30 if IS_CUDA else 2**25)
TOTAL_PARAMS = int(os.environ.get("DGG_BENCH_STEP_PARAMS", str(DEFAULT_PARAMS)))
HIDDEN = 16 if SMOKE else (3584 if IS_CUDA else 512)
N_LAYERS = 2 if SMOKE else 28
ROUNDS = 1 if SMOKE else int(os.environ.get("DGG_BENCH_ROUNDS", "15"))
#: The paired A/B comparison takes at least ROUNDS pairs and as many more (up to 200) as fit in this many seconds.
PAIR_BUDGET_S = float(os.environ.get("DGG_BENCH_PAIR_BUDGET_S", "10"))
MIN_PAIRS = 2 if SMOKE else ROUNDS
MAX_PAIRS = 2 if SMOKE else 200
WINDOW = 8
#: The float64 torch reference is the tests' oracle, not a production path: the step suite times it only when no
#: compiled backend is available (or DGG_BENCH_STEP_ALL_BACKENDS=1); the energy suite always times every backend.
STEP_ALL_BACKENDS = os.environ.get("DGG_BENCH_STEP_ALL_BACKENDS", "") not in ("", "0")
STEP_BACKENDS = BACKENDS if STEP_ALL_BACKENDS or BACKENDS == ["torch"] else [b for b in BACKENDS if b != "torch"]
#: Large enough that clipping never rescales (coefficient clamps to 1): the cost is the same either way, and the
#: gradients (never zeroed here) stay the same from step to step, so the gate sees a steady energy.
MAX_NORM = 1e6
#: The naive gate's threshold: never exceeded, so it times an applied step like the others.
NAIVE_THRESHOLD = float("inf")
#: The floor's threshold on the energy: never exceeded either.
FLOOR_THRESHOLD = float("inf")

FRACS = {"lm8": 0.08, "lm50": 0.50}
CLIPS = ["noclip", "clip"]
VARIANTS = ["bare", "read", "floor"] + [f"ours[{b}]" for b in STEP_BACKENDS] + ["naive"]
CASES = [(s, c, v) for s in FRACS for c in CLIPS for v in VARIANTS]


class ParamSet:
    """A decoder-like list of fp32 Parameters with gradients; the lm_head is the last one (as in HF models)."""

    def __init__(self, name: str, lm_frac: float, total: int = TOTAL_PARAMS, hidden: int = HIDDEN) -> None:
        vocab = max(1, round(lm_frac * total / hidden))
        per_layer = (total - vocab * hidden) / N_LAYERS
        cols = max(1, round((per_layer - 2 * hidden) / (7 * hidden)))
        shapes = [(cols, hidden)] * 7 + [(hidden,)] * 2
        gen = torch.Generator(device=DEVICE).manual_seed(0)
        self.params: list[nn.Parameter] = []
        for _ in range(N_LAYERS):
            for s in shapes:
                self.params.append(self._param(s, gen))
        self.lm_head = self._param((vocab, hidden), gen)
        self.params.append(self.lm_head)
        self.name = name
        self.numel = sum(p.numel() for p in self.params)
        self.lm_numel = self.lm_head.numel()
        self.lm_shape = (vocab, hidden)
        self.body_shapes = shapes

    @staticmethod
    def _param(shape, gen) -> nn.Parameter:
        p = nn.Parameter(torch.randn(shape, generator=gen, device=DEVICE).mul_(0.02))
        p.grad = torch.randn(shape, generator=gen, device=DEVICE).mul_(1e-3)
        return p


_SET: dict[str, ParamSet] = {}


def param_set(name: str) -> ParamSet:
    """Cache of one: the cases run set by set, so at most one set is alive."""
    if name not in _SET:
        _SET.clear()
        _SET[name] = ParamSet(name, FRACS[name])
    return _SET[name]


def bytes_moved(ps: ParamSet, clip: bool) -> int:
    return (28 + (12 if clip else 0)) * ps.numel


def make_bare(ps: ParamSet, clip: bool):
    opt = torch.optim.AdamW(ps.params, lr=1e-6, fused=True)

    def step() -> None:
        if clip:
            torch.nn.utils.clip_grad_norm_(ps.params, MAX_NORM, foreach=True)
        opt.step()

    return opt, step


def make_naive(ps: ParamSet, clip: bool):
    opt = torch.optim.AdamW(ps.params, lr=1e-6, fused=True)
    g = ps.lm_head.grad
    skipped = [0]

    def step() -> None:
        if clip:
            torch.nn.utils.clip_grad_norm_(ps.params, MAX_NORM, foreach=True)
        if torch.linalg.vector_norm(g).item() > NAIVE_THRESHOLD:  # the host waits here for everything queued so far
            skipped[0] += 1
            return
        opt.step()

    step.skipped = skipped  # type: ignore[attr-defined]
    return opt, step


def _energy_kernel():
    """The compiled energy kernel for the bench device, called directly (fallback: torch's vector_norm)."""
    from dgg_fused.ops import available_backends

    if any(b in available_backends(DEVICE) for b in ("cpp", "cuda")):
        return lambda g: torch.ops.dgg_fused._C_sumsq([g])
    return lambda g: torch.linalg.vector_norm(g).square()


def make_read(ps: ParamSet, clip: bool):
    """The lm_head gradient read alone, then the bare step."""
    opt, bare = make_bare(ps, clip)
    energy, g = _energy_kernel(), ps.lm_head.grad

    def step() -> None:
        energy(g)
        bare()

    return opt, step


def make_floor(ps: ParamSet, clip: bool):
    """The cheapest sync-free gate: the read, one compare on the device, the fused step with found_inf."""
    opt = torch.optim.AdamW(ps.params, lr=1e-6, fused=True)
    energy, g = _energy_kernel(), ps.lm_head.grad
    thr = torch.tensor(FLOOR_THRESHOLD, device=DEVICE)
    found_inf = torch.zeros((), dtype=torch.float32, device=DEVICE)
    opt.found_inf = found_inf  # torch's fused AdamW reads it (as GradScaler and GatedOptimizer set it)

    def step() -> None:
        if clip:
            torch.nn.utils.clip_grad_norm_(ps.params, MAX_NORM, foreach=True)
        torch.gt(energy(g), thr, out=found_inf)
        opt.step()

    step.found_inf = found_inf  # type: ignore[attr-defined]
    return opt, step


def make_ours(ps: ParamSet, clip: bool, backend: str):
    # fold_clip=True (opt-in): the clip coefficient rides in the fused kernel's grad_scale (the fast clip path)
    kwargs = {"max_grad_norm": MAX_NORM, "fold_clip": True} if clip else {}
    opt = GatedOptimizer(
        torch.optim.AdamW(ps.params, lr=1e-6, fused=True),
        lm_head=[ps.lm_head],
        config=GateConfig(window=WINDOW, max_reuse=4),
        backend=backend,
        **kwargs,
    )
    opt.set_reuse_index(1)  # fill the window with on-policy steps ...
    for _ in range(WINDOW):
        opt.step()
    opt.set_reuse_index(2)  # ... then time reuse-pass steps: the gate is active on every one
    return opt, opt.step


def _set_info(ps: ParamSet, clip: bool) -> dict:
    moved = bytes_moved(ps, clip)
    lm_bytes = 4 * ps.lm_numel
    return {
        "suite": "step",
        "param_set": ps.name,
        "clip": clip,
        "max_grad_norm": MAX_NORM if clip else None,
        "params": ps.numel,
        "tensors": len(ps.params),
        "lm_head_shape": list(ps.lm_shape),
        "lm_head_fraction": ps.lm_numel / ps.numel,
        "body_shapes": [list(s) for s in ps.body_shapes],
        "layers": N_LAYERS,
        "lm_head_grad_bytes": lm_bytes,
        "bare_bytes_moved": moved,
        "ideal_overhead": lm_bytes / moved,
    }


@pytest.mark.parametrize(("set_name", "clip_name", "variant"), CASES, ids=[f"{s}-{c}-{v}" for s, c, v in CASES])
def test_step_overhead(benchmark, set_name: str, clip_name: str, variant: str) -> None:
    clip = clip_name == "clip"
    if variant.startswith("ours[") and clip and not HAS_MAX_GRAD_NORM:
        pytest.skip(NO_MAX_GRAD_NORM)
    ps = param_set(set_name)
    flush = CacheFlusher()
    ctx: dict = {}  # everything that holds optimizer state, released at the end of the test
    info = common_extra_info()
    info.update(_set_info(ps, clip), variant=variant, role=variant.split("[")[0])

    if variant == "bare":
        ctx["opt"], step = make_bare(ps, clip)
    elif variant == "naive":
        ctx["opt"], step = make_naive(ps, clip)
    elif variant == "read":
        ctx["opt"], step = make_read(ps, clip)
    elif variant == "floor":
        ctx["opt"], step = make_floor(ps, clip)
    else:
        backend = variant[len("ours[") : -1]
        why = backend_unusable(backend)
        if why:
            pytest.skip(f"{variant} cannot run on {DEVICE}: {why}")
        try:
            ctx["opt"], step = make_ours(ps, clip, backend)
        except Exception as exc:  # e.g. the Triton backend on CPU tensors
            pytest.skip(f"{variant} cannot run on {DEVICE}: {type(exc).__name__}: {exc}")
        info["backend"] = backend
    step()  # warm-up (lazy state init)
    sync()

    syncs, breakdown = count_host_syncs(step)
    info.update(host_syncs_per_step=syncs, host_sync_ops=breakdown)
    info["cuda_sync_debug_warnings_per_step"] = count_cuda_sync_warnings(step)

    if variant != "bare":
        ctx["bare_opt"], bare_step = make_bare(ps, clip)
        bare_step()
        sync()
        t0 = time.perf_counter()
        flush()
        bare_step()
        sync()
        pairs = max(MIN_PAIRS, min(MAX_PAIRS, int(PAIR_BUDGET_S / (2 * (time.perf_counter() - t0)))))
        info.update(paired_ratios(bare_step, step, pairs, flush))
        info["paired_overhead"] = info["paired_ratio_median"] - 1.0
        launches = count_cuda_launches(step)
        if launches is not None:
            base = count_cuda_launches(bare_step)
            info.update(launches_per_step=launches, bare_launches_per_step=base)
            info["added_kernels_per_step"] = launches["kernels"] - base["kernels"]
            info["added_kernel_names"] = added_kernel_names(launches, base)
        else:
            info["launches_per_step"] = f"n/a: {NO_CUDA_REASON}"
        del ctx["bare_opt"], bare_step

    timed = DeviceTimed(step)
    benchmark.group = f"step {set_name} {clip_name}"
    benchmark.extra_info.update(info)
    benchmark.pedantic(timed, setup=flush, rounds=ROUNDS, warmup_rounds=1 if not SMOKE else 0, iterations=1)
    if IS_CUDA:
        benchmark.extra_info["event_median_s"] = timed.event_median_s()
    _check_no_trip(variant, ctx["opt"], step, benchmark.extra_info)
    ctx.clear()


def _check_no_trip(variant: str, opt, step, info: dict) -> None:
    """A gate that tripped while being timed timed skipped steps: fail the benchmark rather than report them."""
    if variant.startswith("ours["):
        m = opt.get_metrics()
        info.update(gated_steps=m["gated_steps"], stopped_batches=m["stopped_batches"], gate_steps=m["steps"])
        tripped = m["gated_steps"] + m["stopped_batches"]
    elif variant == "naive":
        tripped = step.skipped[0]
    elif variant == "floor":
        tripped = int(step.found_inf.item() != 0)
    else:
        return
    info["trips_while_timed"] = tripped
    if tripped:
        raise RuntimeError(f"{variant}: the gate tripped while timed ({tripped} skipped steps): the timing is void")


# ------------------------------------------------------------------------------------------ pipeline (CUDA only)


class QueuedWork:
    """A stand-in for forward+backward: a few large matmuls and many small kernels, all queued asynchronously."""

    def __init__(self, n_mm: int = 4, n_small: int = 200, size: int = 4096) -> None:
        self.a = torch.randn(size, size, device=DEVICE, dtype=torch.bfloat16)
        self.b = torch.randn(size, size, device=DEVICE, dtype=torch.bfloat16)
        self.c = torch.empty(size, size, device=DEVICE, dtype=torch.bfloat16)
        self.x = torch.zeros(1024, device=DEVICE)
        self.n_mm, self.n_small = n_mm, n_small

    def __call__(self) -> None:
        for _ in range(self.n_mm):
            torch.mm(self.a, self.b, out=self.c)
        for _ in range(self.n_small):
            self.x.add_(1.0)


PIPE_STEPS = 10
PIPE_VARIANTS = ["bare", "ours[auto]", "naive"]


@pytest.mark.skipif(not IS_CUDA, reason=f"{NO_CUDA_REASON}; on CPU every op runs synchronously, so a host sync "
                    "costs nothing beyond the op itself (the step groups measure that)")
@pytest.mark.parametrize("variant", PIPE_VARIANTS)
def test_step_pipeline(benchmark, variant: str) -> None:
    ps = param_set("lm8")
    work = QueuedWork()
    ctx: dict = {}
    if variant == "bare":
        ctx["opt"], step = make_bare(ps, False)
    elif variant == "naive":
        ctx["opt"], step = make_naive(ps, False)
    else:
        ctx["opt"], step = make_ours(ps, False, "auto")

    def loop() -> None:
        for _ in range(PIPE_STEPS):
            work()
            step()

    loop()
    sync()
    timed = DeviceTimed(loop)
    benchmark.group = "pipeline lm8 (10 steps with queued work per call)"
    benchmark.extra_info.update(common_extra_info())
    benchmark.extra_info.update(
        _set_info(ps, False), suite="pipeline", variant=variant, role=variant.split("[")[0],
        steps_per_call=PIPE_STEPS, work=f"{work.n_mm} bf16 4096^3 matmuls + {work.n_small} small kernels",
    )
    benchmark.pedantic(timed, rounds=max(ROUNDS // 3, 1), warmup_rounds=1, iterations=1)
    benchmark.extra_info["event_median_s"] = timed.event_median_s()
    ctx.clear()
