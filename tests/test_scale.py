"""GateConfig(action="scale"): on reuse passes the step is taken with its learning rate multiplied by a factor from
the drift statistic (VCPO's soft action). The factor rule; the exactness statement (a scaled step is bit-identical to
the same inner optimizer stepped with the Python float lr ``float(float32(lr * f))``), with every optimizer of the
suite; LR schedulers and tensor learning rates; no host sync with fused optimizers (one on the host path); the
public seam; checkpoints; and why the learning rate and not the gradient (Adam normalises the gradient)."""

from __future__ import annotations

import copy
import io
import math
import warnings

import numpy as np
import pytest
import torch

from dgg_fused import GateConfig, GatedOptimizer
from dgg_fused.gate import GateState, gate_step_
from dgg_fused.skip import StepDecision
from dgg_fused.testing import record_syncs
from helpers import FUSED, OPTIMIZERS, assert_bit_identical, batch, loss_fn, make_model, snapshot

F32 = np.float32
ESS = GateConfig(energy=False, drift="ess", drift_threshold=0.5, action="scale")
KL = GateConfig(energy=False, drift="approx_kl", drift_threshold=0.02, action="scale")
quiet_host_path = pytest.mark.filterwarnings("ignore:GatedOptimizer.*cannot skip")


# ---------------------------------------------------------------- configuration
@pytest.mark.parametrize("kw,match", [
    ({}, "needs drift"),
    ({"drift": "ess"}, "drift-only: set energy=False"),
    ({"energy": False, "drift": "ess", "drift_rule": "zscore"}, "needs drift_rule='threshold'"),
])
def test_scale_config_errors(kw, match):
    with pytest.raises(ValueError, match=rf"GateConfig\.action='scale'.*{match}"):
        GateConfig(action="scale", **kw)
    assert ESS.reference_only and ESS.trip_direction == "below" and KL.trip_direction == "above"


# ---------------------------------------------------------------- the factor, on the reference rule
def _factors(cfg, seq):
    st = GateState.create(cfg.window, "cpu")
    out = []
    for k, d in seq:
        st.set_reuse_index(k)
        skip = gate_step_(st, None, cfg, drift=torch.tensor(d, dtype=torch.float32)).item()
        out.append((st.scale.item(), skip, bool(st.stopped), st.last[2].item()))
    return out, st


def test_factor_below_statistic():
    seq = [(1, 0.01), (2, 0.9), (2, 0.5), (3, 0.25), (4, 0.0), (2, float("nan")), (3, 0.4)]
    got, st = _factors(ESS, seq)
    expect_f = [1.0, 1.0, 1.0, float(F32(0.25) / F32(0.5)), 0.0, 0.0, float(F32(F32(0.4) / F32(0.5)))]
    assert [g[0] for g in got] == expect_f  # first pass never scaled; d >= t: 1; d < t: d / t; NaN: dropped (0)
    assert [g[1] for g in got] == [0, 0, 0, 0, 0, 1, 0]  # only the non-finite statistic drops its step
    assert not any(g[2] for g in got)  # no batch is ever stopped
    assert [g[3] for g in got] == [0, 0, 0, 1, 1, 1, 1]  # "gated": the rule fired (the step was scaled or dropped)
    assert st.counters.tolist() == [7, 1, 4]  # steps, dropped steps, steps on which the rule fired


def test_factor_above_statistic():
    seq = [(1, 5.0), (2, 0.04), (2, 0.01), (2, -1e-9), (3, 0.02), (4, float("inf"))]
    got, _ = _factors(KL, seq)
    assert [g[0] for g in got] == [1.0, float(F32(F32(0.02) / F32(0.04))), 1.0, 1.0, 1.0, 0.0]
    assert [g[1] for g in got] == [0, 0, 0, 0, 0, 1]


# ---------------------------------------------------------------- exactness, with every optimizer of the suite
DRIFT = {(0, 2): 0.9, (0, 3): 0.25, (0, 4): 0.05, (1, 2): 0.4, (1, 3): float("nan"), (1, 4): 0.1, (2, 2): 0.5,
         (2, 3): 0.3, (2, 4): 1e-3}  # ess per (batch, k); the first passes: 1.0


def _expected_factor(d: float) -> float:
    """The factor by hand, in float32: 1 for d >= t, d / t below it, None (step dropped) for a non-finite d."""
    if not math.isfinite(d):
        return None
    return 1.0 if F32(d) >= F32(0.5) else float(min(F32(1.0), F32(d) / F32(0.5)))


def _gated_run(name, lr_tensor=False, scheduler=False):
    model = make_model()
    inner = OPTIMIZERS[name](model.parameters())
    if lr_tensor:
        for g in inner.param_groups:
            g["lr"] = torch.tensor(g["lr"])
    opt = GatedOptimizer(inner, lm_head=None, config=ESS)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.9) if scheduler else None
    factors = []
    for b in range(3):
        for k in opt.passes():  # reuse is never stopped: every pass runs
            lr_before = [g["lr"] for g in opt.param_groups]
            opt.record_drift(ess=torch.tensor(DRIFT.get((b, k), 1.0)))
            loss_fn(model, batch(10 * b + k)).backward()
            opt.step()
            assert all(g["lr"] is lr for g, lr in zip(opt.param_groups, lr_before))  # the very object put back
            factors.append(opt.get_metrics()["scale"])
            opt.zero_grad()
            if sched:
                sched.step()
    return model, opt, factors


def _reference_run(name, as_tensor=False, scheduler=False):
    """The bare optimizer, its lr set by hand on reuse passes to float(float32(lr * f)) (or that float32 value as a
    tensor), the dropped step not taken, first passes untouched."""
    model = make_model()
    inner = OPTIMIZERS[name](model.parameters())
    sched = torch.optim.lr_scheduler.StepLR(inner, step_size=1, gamma=0.9) if scheduler else None
    for b in range(3):
        for k in range(1, 5):
            loss_fn(model, batch(10 * b + k)).backward()
            f = _expected_factor(DRIFT.get((b, k), 1.0))
            if f is not None:
                saved = [g["lr"] for g in inner.param_groups]
                if k > 1:
                    for g in inner.param_groups:
                        v = F32(np.float64(g["lr"]) * np.float64(f))
                        g["lr"] = torch.tensor(v) if as_tensor else float(v)
                inner.step()
                for g, lr in zip(inner.param_groups, saved):
                    g["lr"] = lr
            inner.zero_grad()
            if sched:
                sched.step()
    return model, inner


@quiet_host_path
@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_a_scaled_step_is_the_same_optimizer_with_that_lr_bit_for_bit(name):
    m_gate, gate, factors = _gated_run(name)
    expect = [1.0 if k == 1 else _expected_factor(DRIFT.get((b, k), 1.0)) for b in range(3) for k in range(1, 5)]
    assert factors == [0.0 if f is None else f for f in expect]
    m_ref, ref = _reference_run(name)
    assert_bit_identical(snapshot(m_gate, gate), snapshot(m_ref, ref), f"{name}: scale gate vs lr set by hand")
    if name in FUSED:  # the float32 tensor the gate hands over: read by the kernels as the same value
        m_t, ref_t = _reference_run(name, as_tensor=True)
        assert_bit_identical(snapshot(m_gate, gate), snapshot(m_t, ref_t), f"{name}: vs a float32 tensor lr")
    m = gate.get_metrics()
    assert (m["steps"], m["gated_steps"], m["stopped_batches"]) == (12, 1, 7)


def test_first_passes_are_not_rounded():
    """A first pass keeps the group's own lr; a reuse step with factor 1 runs with float32(lr): for lr = 1e-2 (not
    a float32 value) that is a different step, so the gate must not hand a factor on k = 1."""
    assert float(F32(1e-2)) != 1e-2
    m_gate, gate, _ = _gated_run("adamw_fused")
    m_ref, ref = _reference_run("adamw_fused")
    assert_bit_identical(snapshot(m_gate, gate), snapshot(m_ref, ref))


@pytest.mark.parametrize("name", ["adamw_fused", "sgd_momentum_fused"])
def test_lr_scheduler_and_tensor_lr_survive_a_scaled_step(name):
    """An LR scheduler keeps working (the group's lr is put back after each scaled step, and the scaled step uses the
    scheduled lr); a tensor lr stays the very tensor, unchanged."""
    m_gate, gate, _ = _gated_run(name, scheduler=True)
    m_ref, ref = _reference_run(name, scheduler=True)
    assert_bit_identical(snapshot(m_gate, gate), snapshot(m_ref, ref), f"{name} with StepLR")
    assert gate.param_groups[0]["lr"] == ref.param_groups[0]["lr"] == pytest.approx(1e-2 * 0.9**12)
    model, opt, _ = _gated_run(name, lr_tensor=True)
    lr = opt.param_groups[0]["lr"]
    assert isinstance(lr, torch.Tensor) and lr.item() == float(F32(1e-2))


# ---------------------------------------------------------------- no host sync (fused), one on the host path
@pytest.mark.parametrize("name", sorted(FUSED))
def test_fused_scaled_steps_never_sync(name):
    model = make_model()
    opt = GatedOptimizer(OPTIMIZERS[name](model.parameters()), lm_head=None, config=ESS)
    opt.set_reuse_index(1)
    opt.record_drift(ess=torch.tensor(1.0))
    loss_fn(model, batch(0)).backward()
    opt.step()  # primes fused SGD's momentum (its first step runs on the host)
    opt.zero_grad()
    with record_syncs() as rec:
        for k, d in ((2, 0.2), (3, 0.9), (4, float("nan")), (1, 0.1)):
            opt.set_reuse_index(k)
            opt.record_drift(ess=torch.tensor(d))
            loss_fn(model, batch(k)).backward()
            opt.step()
            opt.zero_grad()
    assert rec.events == [], rec.events


def test_host_path_reads_skip_and_factor_in_one_sync_and_warns_once():
    m_bare, model = make_model(), make_model()
    bare = OPTIMIZERS["adamw_foreach"](m_bare.parameters())
    opt = GatedOptimizer(OPTIMIZERS["adamw_foreach"](model.parameters()), lm_head=None, config=ESS)
    assert opt.plan.skip_path == "host"
    with pytest.warns(UserWarning, match="one device sync per reuse-pass step"):
        opt.set_reuse_index(2)
        opt.record_drift(ess=torch.tensor(0.2))
        loss_fn(model, batch(0)).backward()
        opt.step()
        opt.zero_grad()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # warned once only
        for k, extra in ((1, []), (2, ["Tensor.tolist"])):  # k == 1 is never scaled: nothing read
            with record_syncs() as rec_bare:
                loss_fn(m_bare, batch(k)).backward()
                bare.step()
                bare.zero_grad()
            with record_syncs() as rec:
                opt.set_reuse_index(k)
                opt.record_drift(ess=torch.tensor(0.2))
                loss_fn(model, batch(k)).backward()
                opt.step()
                opt.zero_grad()
            assert sorted(rec.events) == sorted(rec_bare.events + extra), k


# ---------------------------------------------------------------- the public seam, checkpoints, GradScaler
def test_decide_once_apply_many_scales_every_call_and_restores_the_lr():
    """What the DeepSpeed mode does (one decision, one inner call per parameter group): every apply_ runs with the
    scaled lr and puts the group's lr back; decide_ then apply_ is step() bit for bit."""
    runs = []
    for seam in (False, True):
        model = make_model()
        opt = GatedOptimizer(OPTIMIZERS["adamw_fused"](model.parameters()), lm_head=None, config=ESS)
        for k in (1, 2):
            opt.set_reuse_index(k)
            opt.record_drift(ess=torch.tensor(0.25))
            loss_fn(model, batch(k)).backward()
            if seam:
                with opt.step_hooks():
                    d = opt.decide_()
                assert isinstance(d, StepDecision) and (d.lr_scale is None) == (k == 1)
                opt.apply_(d)
            else:
                opt.step()
            opt.zero_grad()
        runs.append(snapshot(model, opt))
        assert opt.param_groups[0]["lr"] == 1e-2
    assert_bit_identical(runs[0], runs[1], "seam vs step")


def test_scale_gate_checkpoint_round_trip():
    """A scale gate's counters (the rule fired on more steps than it dropped) load; resuming is bit-exact."""
    m_full, full, _ = _gated_run("adamw_fused")
    model = make_model()
    opt = GatedOptimizer(OPTIMIZERS["adamw_fused"](model.parameters()), lm_head=None, config=ESS)
    for b in range(3):
        for k in opt.passes():
            if (b, k) == (1, 3):  # save and resume mid-batch, on a reuse pass
                buf = io.BytesIO()
                torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buf)
                buf.seek(0)
                ck = torch.load(buf, weights_only=True)
                model = make_model(seed=7)
                model.load_state_dict(ck["model"])
                opt = GatedOptimizer(OPTIMIZERS["adamw_fused"](model.parameters()), lm_head=None, config=ESS)
                opt.load_state_dict(ck["opt"])
            opt.record_drift(ess=torch.tensor(DRIFT.get((b, k), 1.0)))
            loss_fn(model, batch(10 * b + k)).backward()
            opt.step()
            opt.zero_grad()
    assert_bit_identical(snapshot(m_full, full), snapshot(model, opt), "resumed scale gate")
    assert repr(full.get_metrics()) == repr(opt.get_metrics())  # (NaN energy: no lm_head)


def test_grad_scaler_with_a_scale_gate():
    """A GradScaler's overflow still drops its step (not a trip), and its unscaling composes with the lr factor:
    the same as the bare optimizer under the scaler with the lr set by hand."""
    outs = []
    for gated in (True, False):
        model = make_model()
        inner = OPTIMIZERS["adamw_fused"](model.parameters())
        opt = GatedOptimizer(inner, lm_head=None, config=ESS) if gated else inner
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8, growth_interval=2)
        for k, d in ((1, 1.0), (2, 0.25), (3, 0.1)):
            if gated:
                opt.set_reuse_index(k)
                opt.record_drift(ess=torch.tensor(d))
            loss = loss_fn(model, batch(k)) * (float("inf") if k == 3 else 1.0)  # k = 3 overflows
            scaler.scale(loss).backward()
            if not gated and k > 1:
                inner.param_groups[0]["lr"] = float(F32(1e-2 * float(F32(F32(d) / F32(0.5)))))
            scaler.step(opt)
            scaler.update()
            inner.param_groups[0]["lr"] = 1e-2
            opt.zero_grad()
        outs.append(snapshot(model, inner))
        if gated:
            m = opt.get_metrics()
            assert (m["gated_steps"], m["stopped_batches"]) == (0, 1)  # k = 3: the scaler's, not the gate's
    assert_bit_identical(outs[0], outs[1], "GradScaler + scale gate")


# ---------------------------------------------------------------- why the learning rate: Adam normalises
def test_adam_normalises_a_gradient_scale_but_not_an_lr_scale():
    """The figures of docs/rule.md (benchmarks/adam_lr_vs_grad_scale.py): an AdamW step with the gradient x f is
    nearly the plain step (exactly, up to eps, on a first step), while the scale gate's lr x f scales the update
    by f."""
    import importlib.util
    import pathlib

    path = pathlib.Path(__file__).parents[1] / "benchmarks" / "adam_lr_vs_grad_scale.py"
    spec = importlib.util.spec_from_file_location("adam_lr_vs_grad_scale", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    for warm, f in ((0, 0.1), (20, 0.1), (20, 0.01)):
        by_grad, by_lr = mod.update_ratios(f, warm)
        assert by_lr == pytest.approx(f, rel=2e-3)  # (the float32 parameters round an update of lr x 0.01)
        assert by_grad > (0.99 if warm == 0 else 0.85), (warm, f, by_grad)
