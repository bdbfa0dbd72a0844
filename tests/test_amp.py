"""torch.amp.GradScaler with the gate (CPU scaler): the gate sees unscaled energy, its skip combines with the
scaler's inf/nan skip exactly, overflows are not trips, and scaler.update() keeps working."""

from __future__ import annotations

import pytest
import torch

from dgg_fused import GateConfig, GatedOptimizer
from dgg_fused.ops.reference import grad_sumsq_reference
from helpers import assert_bit_identical, batch, loss_fn, make_model, snapshot

K = 4
# std_floor=0.5 and tau=50: only the injected spikes (energy x 1e6) can trip, never natural batch-to-batch noise
CFG = GateConfig(window=2, tau=50.0, std_floor=0.5, max_reuse=K)
SPIKES = {10, 15}  # k=3 with a full window; k=4
OVERFLOW_OTHER = {1, 13}  # inf in a non-lm_head gradient (finite lm_head energy): k=2 before / after the window fills
OVERFLOW_HEAD = {4, 11}  # inf in the lm_head gradient: on a k=1 step (must not enter the window); on a stopped batch
STEPS = 16

INNER = {
    "adamw_fused": lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=0.1, fused=True),  # scaler hands found_inf
    "adamw_foreach": lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=0.1, foreach=True),  # scaler unscales
}


def _backward(model, scaler, step):
    scale = 1e3 if step in SPIKES else 1.0
    scaler.scale(loss_fn(model, batch(step // K), scale)).backward()
    if step in OVERFLOW_OTHER:
        model.mlp[0].weight.grad[0, 0] = float("inf")
    if step in OVERFLOW_HEAD:
        model.lm_head.weight.grad[1, 1] = float("nan")


@pytest.mark.filterwarnings("ignore:GatedOptimizer")
@pytest.mark.parametrize("name", sorted(INNER))
def test_gate_and_scaler_skips_combine_exactly(name):
    def scaler():
        return torch.amp.GradScaler("cpu", init_scale=2.0**12, growth_interval=2)

    model_g = make_model()
    opt = GatedOptimizer(INNER[name](model_g.parameters()), lm_head=model_g.lm_head, config=CFG)
    sc_g = scaler()
    model_r = make_model()  # reference: the bare optimizer, skipping by hand the steps the gate dropped
    ref = INNER[name](model_r.parameters())
    sc_r = scaler()

    scales, gated, skipped = [], [], []
    for step in range(STEPS):
        opt.set_reuse_index(step % K + 1)
        _backward(model_g, sc_g, step)
        head_sumsq = grad_sumsq_reference([model_g.lm_head.weight.grad], out_dtype=torch.float64).item()
        scale_now = sc_g.get_scale()
        steps_before = opt.get_metrics()["steps"]
        sc_g.step(opt)
        sc_g.update()
        m = opt.get_metrics()
        stepped = m["steps"] == steps_before + 1  # the host path's step() is not even called on an overflow
        gate_skip = stepped and bool(m["skipped"])
        if stepped and step not in OVERFLOW_HEAD:
            assert m["energy"] == pytest.approx(head_sumsq / scale_now**2, rel=1e-5), step  # unscaled energy
        opt.zero_grad()

        _backward(model_r, sc_r, step)
        if gate_skip:
            sc_r.unscale_(ref)  # record the scaler's own inf check, do not step
        else:
            sc_r.step(ref)
        sc_r.update()
        ref.zero_grad()

        assert_bit_identical(snapshot(model_r, ref), snapshot(model_g, opt), f"{name} step {step}")
        assert sc_g.get_scale() == sc_r.get_scale()
        scales.append(sc_g.get_scale())
        gated.append(bool(m["gated"]) and stepped)
        skipped.append(gate_skip)

    assert [s for s in range(STEPS) if gated[s]] == sorted(SPIKES)  # overflows are never trips
    # step 11 overflows on a stopped batch: the fused path sees it (and counts it as a gate skip, the batch is
    # stopped); with a non-fused optimizer the scaler skips the call to step() altogether
    assert [s for s in range(STEPS) if skipped[s]] == ([10, 11, 15] if name == "adamw_fused" else [10, 15])
    assert opt.get_metrics()["stopped_batches"] == 2
    # scaler.update() still works: it backs off after each overflow and grows after growth_interval clean steps
    assert any(b < a for a, b in zip(scales, scales[1:])) and any(b > a for a, b in zip(scales, scales[1:]))


def test_unscale_then_record_energy_before_clipping():
    """The pre-clip pattern: unscale_, record_energy (unscaled, unclipped), clip, scaler.step."""

    def run(wrap):
        model = make_model()
        inner = torch.optim.AdamW(model.parameters(), lr=1e-2, fused=True)
        opt = GatedOptimizer(inner, lm_head=model.lm_head, config=CFG) if wrap else inner
        sc = torch.amp.GradScaler("cpu", init_scale=2.0**10)
        seen = []
        for step in range(6):
            if wrap:
                opt.set_reuse_index(step % K + 1)
            sc.scale(loss_fn(model, batch(step))).backward()
            sc.unscale_(opt)
            want = grad_sumsq_reference([model.lm_head.weight.grad], out_dtype=torch.float64).item()
            if wrap:
                opt.record_energy()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1e-3)
            sc.step(opt)
            sc.update()
            if wrap:
                seen.append((opt.get_metrics()["energy"], want))
            opt.zero_grad()
        return snapshot(model, inner), seen, sc.get_scale()

    (bare, _, scale_b), (wrapped, seen, scale_w) = run(False), run(True)
    assert_bit_identical(bare, wrapped, "unscale_ + clip")
    assert scale_b == scale_w
    for got, want in seen:
        assert got == pytest.approx(want, rel=1e-5)
        assert got > 1e-5  # the unclipped energy (clipped, the whole gradient would have norm 1e-3)
