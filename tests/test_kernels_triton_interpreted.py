"""Triton kernels under the Triton interpreter (CPU).

tests/test_kernels_triton.py runs this file in a child pytest with TRITON_INTERPRET=1, which must be set before
triton is first imported; in the main test process (triton imported normally) the module skips itself."""

from __future__ import annotations

import os

import pytest

if os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("runs in a child process under TRITON_INTERPRET=1 (test_kernels_triton.py)", allow_module_level=True)

import torch

from dgg_fused.ops import available_backends, grad_sumsq, grad_sumsq_reference
from gate_harness import CONFIGS, run_and_compare, sequence


def _ref(ts):
    return grad_sumsq_reference(ts, out_dtype=torch.float64)


def test_triton_is_available_on_cpu_when_interpreted():
    assert "triton" in available_backends("cpu")


CASES = {
    "empty": lambda g: [torch.zeros(0)],
    "one": lambda g: [torch.randn(1, generator=g)],
    "odd": lambda g: [torch.randn(1001, generator=g)],
    "2**20+3-bf16": lambda g: [torch.randn(2**20 + 3, generator=g).bfloat16()],
    "many-small": lambda g: [torch.randn(int(n), generator=g) for n in torch.randint(0, 50, (80,), generator=g)],
    "mixed-dtypes": lambda g: [torch.randn(3000, generator=g), torch.randn(77, 5, generator=g).half(),
                               torch.randn(0).bfloat16(), torch.randn(4099, generator=g).bfloat16()],
    "non-contiguous": lambda g: [torch.randn(64, 33, generator=g).t(), torch.randn(50, 40, generator=g)[::3, 1:],
                                 torch.randn(7, generator=g).expand(5, 7)],
}


@pytest.mark.parametrize("case", list(CASES))
def test_triton_sumsq_matches_float64(case):
    g = torch.Generator().manual_seed(1)
    ts = CASES[case](g)
    ref = _ref(ts)
    out = grad_sumsq(ts, backend="triton")
    assert out.dtype == torch.float32 and out.shape == ()
    # float32 accumulation of >= 0 terms: relative error well under 1e-5 at these sizes (float64 final stage)
    torch.testing.assert_close(out.double(), ref, rtol=2e-6, atol=1e-30)
    runs = [grad_sumsq(ts, backend="triton") for _ in range(2)]
    assert all(torch.equal(r, out) for r in runs), "not bitwise deterministic"


def test_triton_unaligned_views():
    base = torch.randn(10_001)
    ts = [base[1:], base[3:5000].bfloat16()[1:]]  # data_ptr not 16-byte aligned: the ALIGNED=False variant
    torch.testing.assert_close(grad_sumsq(ts, backend="triton").double(), _ref(ts), rtol=2e-6, atol=0)


def test_triton_agrees_with_reference_backend():
    ts = [torch.randn(5000).half(), torch.randn(3, 3)]
    torch.testing.assert_close(grad_sumsq(ts, backend="triton"), grad_sumsq_reference(ts), rtol=1e-6, atol=0)


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: f"{c.statistic}-{c.reference}-w{c.window}")
def test_triton_epilogue_matches_reference(config):
    run_and_compare("triton", config, sequence(3, n=16, adversarial=False))
    run_and_compare("triton", config, sequence(4, n=16, adversarial=True), partials_split=3)


def test_triton_epilogue_takes_triton_partials():
    from dgg_fused.config import GateConfig
    from dgg_fused.gate import GateState, gate_step_
    from dgg_fused.ops.triton_sumsq import sumsq_partials

    cfg = GateConfig(window=2)
    ts = [torch.randn(300_000).bfloat16()]
    parts = sumsq_partials(ts)
    assert parts.numel() > 1
    a, b = GateState.create(2, "cpu"), GateState.create(2, "cpu")
    gate_step_(a, grad_sumsq(ts, backend="triton"), cfg, impl="reference")
    gate_step_(b, parts, cfg, impl="triton")
    assert torch.equal(a.last[0], b.last[0]) and torch.equal(a.window, b.window)


def test_triton_partials_add_up_to_the_energy():
    from dgg_fused.ops import kernel

    ts = [torch.randn(200_000).bfloat16(), torch.randn(77)]
    parts = kernel("triton", partials=True)(ts)
    assert parts.dim() == 1 and parts.numel() > 1
    assert torch.equal(parts.double().sum().float(), grad_sumsq(ts, backend="triton"))


def test_opcheck_triton_backend():
    for ts in ([torch.randn(33)], [torch.randn(4, 5).bfloat16(), torch.randn(0)]):
        torch.library.opcheck(torch.ops.dgg_fused.sumsq_triton.default, (ts,))


def _multi_tile_inputs():
    g = torch.Generator().manual_seed(5)
    # ~10 tiles; a tensor ending mid-tile, tiles spanning several tensors, a masked tail, three dtypes
    return [torch.randn(200_003, generator=g), torch.randn(3, 1000, generator=g).bfloat16(),
            torch.randn(70_001, generator=g).half(), torch.randn(40_000, generator=g).bfloat16()]


def test_triton_result_does_not_depend_on_the_grid():
    from dgg_fused.ops import triton_sumsq as ts

    tensors = _multi_tile_inputs()
    tiles = ts.plan([t.numel() for t in tensors])[0]
    assert tiles >= 8
    base = ts.sumsq_partials(tensors)
    assert base.numel() == tiles
    for programs in (1, 3, tiles - 1, 10 * tiles):  # a program sums 1..tiles tiles, strided
        assert torch.equal(ts.sumsq_partials(tensors, programs=programs), base), programs
        assert torch.equal(ts.sumsq(tensors, programs=programs), ts.sumsq(tensors)), programs
    torch.testing.assert_close(ts.sumsq(tensors).double(), _ref(tensors), rtol=2e-6, atol=0)


def test_sum_partials_fixed_order_beyond_one_block():
    """More partials than one PB-wide load (the loop in sum_partials): integer-valued, so the float64 sum is exact."""
    from dgg_fused.ops import triton_sumsq as ts

    parts = torch.randint(0, 2**20, (3001,)).float()
    out = torch.empty((), dtype=torch.float32)
    ts._sumsq_finalize_kernel[(1,)](parts, parts.numel(), out, PB=ts.partials_block(parts.numel()))
    assert torch.equal(out, parts.double().sum().float())


def test_triton_epilogue_sums_partials_like_the_finalize_kernel():
    from dgg_fused.config import GateConfig
    from dgg_fused.gate import GateState, gate_step_
    from dgg_fused.ops import triton_sumsq as ts

    parts = torch.rand(2500, generator=torch.Generator().manual_seed(2)) * 1e3  # > 1024 partials: several loads
    energy = torch.empty((), dtype=torch.float32)
    ts._sumsq_finalize_kernel[(1,)](parts, parts.numel(), energy, PB=ts.partials_block(parts.numel()))
    st = GateState.create(2, "cpu")
    gate_step_(st, parts, GateConfig(window=2), impl="triton")
    assert torch.equal(st.last[0], energy)


def test_table_cache_survives_reallocated_gradients(monkeypatch):
    """zero_grad(set_to_none=True) reallocates gradients: the layout tables are kept, an address table is built per
    new address set, and a few address sets that repeat (as the caching allocator hands back the same blocks)
    build nothing after the first round."""
    from dgg_fused.ops import triton_sumsq as ts

    built = []
    real = ts._to_device
    monkeypatch.setattr(ts, "_to_device", lambda values, device: built.append(len(values)) or real(values, device))
    monkeypatch.setattr(ts, "_LAYOUTS", type(ts._LAYOUTS)())
    shapes = [(3000,), (50, 7), (70_001,)]
    pools = [[torch.randn(s) for s in shapes] for _ in range(3)]  # three "allocations" of the same gradients
    ref = [ts.sumsq(p) for p in pools]
    n_tensors = len(shapes)
    assert built == [3 * n_tensors + 2 * ts.plan([3000, 350, 70_001])[0], n_tensors, n_tensors, n_tensors]
    built.clear()
    for _ in range(3):  # steady state: addresses cycle among known sets, no table is built
        for p, r in zip(pools, ref):
            assert torch.equal(ts.sumsq(p), r)
    assert built == []
    fresh = [torch.randn(s) for s in shapes]  # a new address set: one address table, the layout is reused
    ts.sumsq(fresh)
    assert built == [n_tensors]
    assert len(ts._LAYOUTS) == 1 and len(next(iter(ts._LAYOUTS.values())).addresses) <= ts._Layout.MAX_ADDRESS_SETS


def test_optimizer_with_triton_backend_takes_the_partials_path():
    """backend="triton": the energy is handed to the gate as stage-1 partials, the Triton epilogue adds them (the
    CUDA fast path, here interpreted); decisions and energies equal the reference backend's, also with a scale."""
    from dgg_fused import GateConfig, GatedOptimizer
    from dgg_fused.testing import internals

    def run(backend, scaled=False):
        torch.manual_seed(0)
        scaler = torch.amp.GradScaler("cpu", init_scale=8.0) if scaled else None
        model = torch.nn.Sequential(torch.nn.Embedding(11, 8), torch.nn.Linear(8, 11))
        opt = GatedOptimizer(torch.optim.AdamW(model.parameters(), lr=1e-2, fused=True), lm_head=model[1],
                             config=GateConfig(window=2, tau=2.0), backend=backend)
        out = []
        for b in range(4):
            for k in opt.passes(2):
                ids = torch.arange(11) % (b + 3)
                loss = torch.nn.functional.cross_entropy(model(ids), ids) * (40.0 if (b, k) == (3, 2) else 1.0)
                if scaler is None:
                    loss.backward()
                    opt.step()
                else:  # the scale reaches the Triton epilogue, which divides by it in the same launch
                    scaler.scale(loss).backward()
                    scaler.step(opt)
                    scaler.update()
                opt.zero_grad()
                m = opt.get_metrics()
                out.append((m["energy"], m["skipped"]))
        return opt, out

    opt, tri = run("triton")
    assert opt.plan.gate_impl == "triton" and opt.plan.energy_backend == "triton" and opt.plan.partials
    for p in opt.lm_head_params:
        p.grad = torch.ones_like(p)
    assert internals(opt).meter.measure().value.dim() == 1  # the energy as stage-1 partials
    _, ref = run("torch")
    _, tri_scaled = run("triton", scaled=True)
    for got in (tri, tri_scaled):
        assert [s for _, s in got] == [s for _, s in ref] and any(s for _, s in got)
        for (a, _), (b, _) in zip(got, ref):
            assert abs(a - b) <= 1e-5 * abs(b)


def test_tile_offsets_past_2_31_are_64_bit():
    """The H200 run lost every element past 2**31 (and the tile straddling it): the tile base `span * t` was
    computed in 32 bits. Here a hand-made layout places a small tensor at global element 2**31 (tile 2048 of span
    2**20; the 2048 tiles before it are empty), so the index arithmetic is that of a > 2**31-element input without
    allocating one."""
    from dgg_fused.ops import triton_sumsq as ts

    span, t0 = 2**20, 2048
    x = torch.arange(1, 5001, dtype=torch.float32) / 64.0
    rows = [t0 * span, x.numel(), 0] + [0, -1] * t0 + [0, 0]  # (start, numel, dtype) | (first, last) per tile
    layout = torch.tensor(rows, dtype=torch.int64)
    addrs = torch.tensor([x.data_ptr()], dtype=torch.int64)
    partials = torch.full((t0 + 1,), float("nan"))
    ts._sumsq_partials_kernel[(1,)](addrs, layout, 1, t0 + 1, span, partials, SUB=ts.SUB, UNROLL=ts.UNROLL,
                                    ALIGNED=False, num_warps=ts.NUM_WARPS)
    assert torch.equal(partials[:t0], torch.zeros(t0))
    torch.testing.assert_close(partials[t0].double(), _ref([x]), rtol=1e-6, atol=0)
