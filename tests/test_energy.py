"""GatedOptimizer(max_grad_norm=...): total-norm clipping sharing the gate's energy pass, on the device."""

from __future__ import annotations

import copy

import pytest
import torch

from dgg_fused import GateConfig, GatedOptimizer
from helpers import batch, loss_fn, make_model, record_syncs


def _pair(max_norm, lr=1e-2, fused=True):
    m1 = make_model(0, bias=True)
    m2 = copy.deepcopy(m1)
    opt1 = GatedOptimizer(torch.optim.AdamW(m1.parameters(), lr=lr, fused=fused), lm_head=m1.lm_head,
                          max_grad_norm=max_norm)
    opt2 = torch.optim.AdamW(m2.parameters(), lr=lr, fused=fused)
    return m1, opt1, m2, opt2


@pytest.mark.filterwarnings("ignore:GatedOptimizer.*cannot skip a step on the device")
@pytest.mark.parametrize("fused", [True, False], ids=["fused", "foreach"])
@pytest.mark.parametrize("max_norm", [0.05, 1e6], ids=["clips", "no-clip"])
def test_matches_clip_grad_norm_then_step(fused, max_norm):
    m1, opt1, m2, opt2 = _pair(max_norm, fused=fused)
    clipped = 0
    for s in range(6):
        data = batch(s)
        loss_fn(m1, data, scale=3.0).backward()
        loss_fn(m2, data, scale=3.0).backward()
        opt1.set_reuse_index(1)  # pass 1 is never gated: the gate only measures
        opt1.step()
        norm2 = torch.nn.utils.clip_grad_norm_(m2.parameters(), max_norm)
        opt2.step()
        torch.testing.assert_close(opt1.grad_norm, norm2, rtol=1e-5, atol=0)
        clipped += int(norm2.item() > max_norm)
        for (n, p1), p2 in zip(m1.named_parameters(), m2.parameters()):
            torch.testing.assert_close(p1.grad, p2.grad, rtol=1e-5, atol=1e-7, msg=lambda m: f"grad {n}: {m}")
            torch.testing.assert_close(p1, p2, rtol=1e-5, atol=1e-6, msg=lambda m: f"param {n}: {m}")
        opt1.zero_grad()
        opt2.zero_grad()
    assert clipped == (6 if max_norm < 1 else 0)


def test_gate_sees_pre_clip_energy_and_gated_step_stays_exact():
    m = make_model(0, bias=True)
    cfg = GateConfig(window=2, tau=0.3)
    opt = GatedOptimizer(torch.optim.AdamW(m.parameters(), lr=1e-2, fused=True), lm_head=m.lm_head, config=cfg,
                         max_grad_norm=0.01)
    for s in range(2):  # fill the window on pass 1
        opt.set_reuse_index(1)
        loss_fn(m, batch(s)).backward()
        opt.step()
        opt.zero_grad()
    opt.set_reuse_index(2)
    loss_fn(m, batch(9), scale=50.0).backward()  # an energy spike on a reuse pass
    head = m.lm_head.weight.grad
    pre = head.double().square().sum().item() + m.lm_head.bias.grad.double().square().sum().item()
    before = {n: p.detach().clone() for n, p in m.named_parameters()}
    opt.step()
    assert opt.get_metrics()["gated"] == 1.0
    assert opt.get_metrics()["energy"] == pytest.approx(pre, rel=1e-5)  # measured before clipping
    for n, p in m.named_parameters():
        assert torch.equal(p, before[n]), n


def test_clip_step_has_no_host_sync():
    m, opt, _, _ = _pair(0.05)
    loss_fn(m, batch(0)).backward()
    opt.step()  # first step: optimizer state allocation happens outside the recorded region
    opt.zero_grad()
    loss_fn(m, batch(1)).backward()
    opt.set_reuse_index(2)
    with record_syncs() as rec:
        opt.step()
    assert rec.events == [], rec.events


def test_recorded_energy_is_remeasured_for_the_clip():
    m1, opt1, m2, opt2 = _pair(0.05)
    loss_fn(m1, batch(0)).backward()
    loss_fn(m2, batch(0)).backward()
    opt1.record_energy()
    for p in list(m1.parameters()) + list(m2.parameters()):  # gradients change after the recording
        p.grad.mul_(0.5)
    opt1.step()
    norm2 = torch.nn.utils.clip_grad_norm_(m2.parameters(), 0.05)
    opt2.step()
    torch.testing.assert_close(opt1.grad_norm, norm2, rtol=1e-5, atol=0)
    for p1, p2 in zip(m1.parameters(), m2.parameters()):
        torch.testing.assert_close(p1, p2, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("bad", [0, -1.0, float("inf"), float("nan"), "1", True])
def test_bad_max_grad_norm(bad):
    m = make_model(0)
    with pytest.raises(ValueError, match="max_grad_norm"):
        GatedOptimizer(torch.optim.AdamW(m.parameters()), lm_head=m.lm_head, max_grad_norm=bad)
