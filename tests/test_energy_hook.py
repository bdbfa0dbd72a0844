"""GatedOptimizer(energy_hook=True): the lm_head energy measured in post-accumulate-grad hooks during backward.

The hook's measurement must be exactly what the step would have measured (bit for bit) or not be used at all:
one and several micro-batches, `accumulating()`, a GradScaler (scaled and unscaled gradients), clipping, gradients
changed or dropped between backward and step; no host sync; the hooks die with the optimizer."""

from __future__ import annotations

import copy
import dataclasses
import gc
import weakref

import pytest
import torch

from dgg_fused import GateConfig, GatedOptimizer
from dgg_fused.testing import internals
from helpers import batch, loss_fn, make_model, record_syncs

pytestmark = pytest.mark.filterwarnings("ignore:GatedOptimizer.step.. with max_reuse")
CFG = GateConfig(window=2, tau=0.5, max_reuse=3)


def _opt(model, hook, **kw):
    inner = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1, fused=True)
    return GatedOptimizer(inner, lm_head=model.lm_head, config=CFG, energy_hook=hook, **kw)


def _hook_recording(opt):
    rec = internals(opt).meter.pending
    return rec if rec is not None and rec.versions is not None else None


@pytest.mark.parametrize("bias", [False, True], ids=["weight", "weight+bias"])
@pytest.mark.parametrize("micro", [1, 3])
def test_hook_energy_is_the_step_energy_bit_for_bit(bias, micro):
    m = make_model(0, bias=bias)
    opt = _opt(m, True)
    assert opt.energy_hook
    for s in range(3):
        for i in range(micro):
            loss_fn(m, batch(10 * s + i), scale=1.0 + i).backward()
        rec = _hook_recording(opt)
        assert rec is not None, "the hook did not measure"
        assert torch.equal(rec.energy.value, internals(opt).meter.measure().value)  # the step-time measurement, same bits
        opt.step()
        assert _hook_recording(opt) is None  # taken by the step
        opt.zero_grad()


def _run(hook, *, steps=12, micro=1, scaler=False, max_norm=None, use_accumulating=False):
    """A gated training run with reuse passes and energy spikes; returns per-step energies/skips and the model."""
    m = make_model(0, bias=True)
    opt = _opt(m, hook, max_grad_norm=max_norm)
    sc = torch.amp.GradScaler("cpu", init_scale=2.0**10) if scaler else None
    energies, skipped, hooked = [], [], 0
    for s in range(steps):
        opt.set_reuse_index(s % 3 + 1)
        for i in range(micro):
            spike = 40.0 if s in (5, 8) and i == micro - 1 else 1.0
            loss = loss_fn(m, batch(s // 3 * 7 + i), scale=spike)
            ctx = opt.accumulating() if (use_accumulating and i < micro - 1) else torch.enable_grad()
            with ctx:
                (sc.scale(loss) if sc else loss).backward()
        hooked += _hook_recording(opt) is not None
        if sc:
            sc.step(opt)
            sc.update()
        else:
            opt.step()
        energies.append(opt.metrics["energy"].clone())
        skipped.append(opt.metrics["skipped"].clone())
        opt.zero_grad()
    assert hooked == (steps if hook else 0)  # with the hook, every step had a measurement from backward to use
    return m, opt, torch.stack(energies), torch.stack(skipped)


@pytest.mark.parametrize(
    "kw",
    [{}, {"micro": 3}, {"micro": 3, "use_accumulating": True}, {"scaler": True}, {"max_norm": 0.05},
     {"micro": 2, "scaler": True, "max_norm": 0.05}],
    ids=["plain", "accum3", "accum3-accumulating", "scaler", "clip", "accum2-scaler-clip"],
)
def test_training_run_is_identical_with_and_without_the_hook(kw):
    m0, _, e0, s0 = _run(False, **kw)
    m1, opt1, e1, s1 = _run(True, **kw)
    assert opt1.energy_hook
    assert torch.equal(e0, e1), (e0 - e1).abs().max()
    assert torch.equal(s0, s1)
    assert s0.sum() > 0, "the run never gated: the parity proves too little"
    for (n, p0), p1 in zip(m0.named_parameters(), m1.parameters()):
        assert torch.equal(p0, p1), n


def test_accumulating_skips_the_reads_of_non_final_micro_batches(monkeypatch):
    m = make_model(0, bias=True)
    opt = _opt(m, True)
    calls = []
    meter = internals(opt).meter
    orig = meter._measure_in_hook
    monkeypatch.setattr(meter, "_measure_in_hook", lambda: (calls.append(1), orig())[1])
    for i in range(3):
        with opt.accumulating() if i < 2 else torch.enable_grad():
            loss_fn(m, batch(i)).backward()
    assert len(calls) == 1  # one measurement for weight+bias of the last backward
    assert torch.equal(_hook_recording(opt).energy.value, meter.measure().value)
    # without the context every backward measures, and a measurement is superseded by the next accumulation
    opt.zero_grad()
    for i in range(3):
        loss_fn(m, batch(i)).backward()
    assert len(calls) == 4


def test_a_measurement_made_stale_is_not_used():
    m = make_model(0, bias=True)
    opt = _opt(m, True)
    loss_fn(m, batch(0)).backward()
    assert _hook_recording(opt) is not None
    m.lm_head.weight.grad.mul_(0.5)  # changed in place after the hook read it (e.g. an external clip)
    opt.step()
    want = internals(opt).meter.measure().total()  # the step measured the halved gradient
    assert torch.equal(opt.metrics["energy"], want)
    # inside accumulating(), the accumulation changes the gradient after the last measurement: stale too
    opt.zero_grad()
    loss_fn(m, batch(1)).backward()
    with opt.accumulating():
        loss_fn(m, batch(2)).backward()
    assert internals(opt).meter.take() == (None, False)


def test_scaler_that_unscaled_in_place_makes_the_step_measure():
    def run(hook):
        m = make_model(0)
        opt = _opt(m, hook, max_grad_norm=0.05)
        sc = torch.amp.GradScaler("cpu", init_scale=2.0**10)
        for s in range(3):
            sc.scale(loss_fn(m, batch(s))).backward()
            sc.unscale_(opt)  # in place, and without bumping the gradients' versions
            sc.step(opt)
            sc.update()
            yield opt.metrics["energy"].clone(), m.lm_head.weight.detach().clone()
            opt.zero_grad()

    for (e0, w0), (e1, w1) in zip(run(False), run(True)):
        assert torch.equal(e0, e1) and torch.equal(w0, w1)
        assert e0 < 1e3  # the unscaled energy, not the scaled one (scale**2 ~ 1e6 larger)


def test_zero_grad_discards_the_measurement():
    m = make_model(0)
    opt = _opt(m, True)
    loss_fn(m, batch(0)).backward()
    assert _hook_recording(opt) is not None
    opt.zero_grad()
    assert internals(opt).meter.pending is None


def test_backward_that_reaches_only_part_of_the_lm_head_still_measures_once():
    m = make_model(0, bias=True)
    opt = _opt(m, True)
    loss_fn(m, batch(0)).backward()
    out = loss_fn(m, batch(1))
    out.backward(inputs=[m.lm_head.bias])  # the weight's accumulator is not executed
    rec = _hook_recording(opt)
    assert rec is not None and torch.equal(rec.energy.value, internals(opt).meter.measure().value)


def test_hook_step_has_no_host_sync():
    m = make_model(0, bias=True)
    opt = _opt(m, True, max_grad_norm=0.05)
    loss_fn(m, batch(0)).backward()
    opt.step()  # optimizer state allocation outside the recorded region
    opt.zero_grad()
    opt.set_reuse_index(2)
    with record_syncs() as rec:
        loss_fn(m, batch(1)).backward()
        opt.step()
    assert rec.events == [], rec.events


def test_hooks_die_with_the_optimizer_and_copies_hook_their_own_parameters():
    m = make_model(0, bias=True)
    opt = _opt(m, True)
    params = list(m.lm_head.parameters())
    assert all(len(p._post_accumulate_grad_hooks) == 1 for p in params)
    c = copy.deepcopy(opt)
    assert c.energy_hook and all(len(p._post_accumulate_grad_hooks) == 1 for p in c.lm_head_params)
    loss_fn(m, batch(0)).backward()
    assert _hook_recording(opt) is not None and internals(c).meter.pending is None  # each measures its own parameters
    ref = weakref.ref(opt)
    del opt
    gc.collect()
    assert ref() is None, "a hook keeps the optimizer alive"
    assert all(not p._post_accumulate_grad_hooks for p in params)
    loss_fn(m, batch(1)).backward()  # no hook left to fire


@pytest.mark.filterwarnings("ignore:GatedOptimizer.*cannot skip a step on the device")
def test_falls_back_with_a_reason_where_the_hook_cannot_be_correct():
    m = make_model(0)
    with pytest.warns(UserWarning, match="energy_hook=True.*not used with AdamW without fused=True"):
        opt = GatedOptimizer(torch.optim.AdamW(m.parameters()), lm_head=m.lm_head, energy_hook=True)
    assert not opt.energy_hook and not m.lm_head.weight._post_accumulate_grad_hooks
    opt = _opt(m, True)
    meter = internals(opt).meter  # staged: a plan whose energy is global (an energy group), no process group needed
    meter.set_plan(dataclasses.replace(opt.plan, global_energy=True), object())
    with pytest.warns(UserWarning, match="measured in step.. instead, because the energy is a global reduction"):
        loss_fn(m, batch(0)).backward()
    assert meter.pending is None


def test_bad_flags():
    m = make_model(0)
    inner = torch.optim.AdamW(m.parameters(), fused=True)
    with pytest.raises(TypeError, match="energy_hook"):
        GatedOptimizer(inner, lm_head=m.lm_head, energy_hook=1)
    with pytest.raises(TypeError, match="fold_clip"):
        GatedOptimizer(inner, lm_head=m.lm_head, fold_clip="yes")
    with pytest.raises(ValueError, match="energy_hook"):
        GatedOptimizer(inner, lm_head=None, config=GateConfig(energy=False, drift="approx_kl"), energy_hook=True)


def test_tied_lm_head_is_measured_once_at_the_end_of_backward():
    """A tied weight (embedding = lm_head) is accumulated once, after both uses: the hook still reads the full
    gradient (no overlap to gain, but the same bits)."""
    m = make_model(0)
    m.lm_head.weight = m.embed.weight
    opt = _opt(m, True)
    loss_fn(m, batch(0)).backward()
    rec = _hook_recording(opt)
    assert rec is not None and torch.equal(rec.energy.value, internals(opt).meter.measure().value)


def test_record_energy_after_backward_takes_precedence():
    """An explicit record_energy() (e.g. before the user's own clip_grad_norm_) replaces the hook's measurement."""
    m = make_model(0)
    opt = _opt(m, True)
    loss_fn(m, batch(0), scale=5.0).backward()
    pre = opt.record_energy().clone()
    torch.nn.utils.clip_grad_norm_(m.parameters(), 1e-3)
    opt.step()
    assert torch.equal(opt.metrics["energy"], pre)


def test_a_second_optimizer_sees_the_gradients_a_fused_fold_clip_step_rewrote():
    """Regression (issue 17, edge 1): a fused step handed a grad_scale (fold_clip, or a GradScaler) writes the
    gradient it used back into .grad without bumping its version counter, so a second optimizer over a shared
    lm_head used its hook's pre-step measurement. The write is now made visible (version bumped after the step):
    the second optimizer measures the rewritten gradient, as it would without the hook."""
    for hook in (True, False):
        m = make_model(0, bias=True)
        first = GatedOptimizer(torch.optim.AdamW(m.parameters(), lr=1e-2, fused=True), lm_head=m.lm_head,
                               config=CFG, max_grad_norm=1e-3, fold_clip=True, energy_hook=hook)
        second = GatedOptimizer(torch.optim.SGD(m.lm_head.parameters(), lr=0.0, fused=True), lm_head=m.lm_head,
                                config=CFG, energy_hook=hook)
        loss_fn(m, batch(0), scale=5.0).backward()
        first.step()  # clips by folding: the fused kernel rewrites .grad (divided by 1/coef)
        second.step()
        now = internals(second).meter.measure().total()
        assert torch.equal(second.metrics["energy"], now), hook
        assert second.metrics["energy"] < first.metrics["energy"]  # the clipped gradient, not the pre-clip one


def test_writes_autograd_does_not_see_need_record_energy():
    """``p.grad.data.mul_`` bypasses the version counter: undetectable, the documented remedy is record_energy()
    after such a write (it replaces the hook's measurement); an in-place op on ``p.grad`` itself is detected."""
    for change, remedy in ((lambda g: g.mul_(10.0), False), (lambda g: g.data.mul_(10.0), True)):
        runs = []
        for hook in (False, True):
            m = make_model(0)
            opt = _opt(m, hook, max_grad_norm=0.5)
            loss_fn(m, batch(0)).backward()
            change(m.lm_head.weight.grad)
            if remedy:
                opt.record_energy()
            opt.step()
            runs.append((opt.metrics["energy"].clone(), opt.grad_norm.clone(), m.lm_head.weight.detach().clone()))
        assert all(torch.equal(a, b) for a, b in zip(*runs))
