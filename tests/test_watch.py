"""GateConfig(action="watch"): the rule is evaluated and recorded, never acted on; the wrapped optimizer is the bare
one, bit for bit, with any optimizer, and no step ever waits for the device."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from dgg_fused import GateConfig, GatedOptimizer, drift_stats
from dgg_fused.gate import GateState, gate_step_
from helpers import OPTIMIZERS, assert_bit_identical, batch, loss_fn, make_model, record_syncs, snapshot

SKIP = GateConfig(window=3, tau=0.3)
WATCH = dataclasses.replace(SKIP, action="watch")
SPIKES = {(3, 2), (4, 3)}  # (batch, k): the loss x 1e3 (energy x 1e6): far above the window


def _run(name, config, steps=6, model_seed=0, scaler=False):
    """Every pass of every batch is run (a watch gate never stops one); returns model, optimizer, per-step metrics."""
    model = make_model(model_seed)
    opt = OPTIMIZERS[name](model.parameters())
    if config is not None:
        opt = GatedOptimizer(opt, lm_head=model.lm_head, config=config)
    sc = torch.amp.GradScaler("cpu", init_scale=2.0**8, growth_interval=2) if scaler else None
    seen = []
    for b in range(steps):
        for k in range(1, 5):
            if config is not None:
                opt.set_reuse_index(k)
            loss = loss_fn(model, batch(10 * b + k), 1e3 if (b, k) in SPIKES else 1.0)
            (sc.scale(loss) if sc else loss).backward()
            if sc:
                sc.step(opt)
                sc.update()
            else:
                opt.step()
            if config is not None:
                seen.append(opt.get_metrics())
            opt.zero_grad()
    return model, opt, seen


@pytest.mark.filterwarnings("ignore:GatedOptimizer.*cannot skip")
@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_watch_is_the_bare_optimizer_bit_for_bit_and_records_the_rule(name):
    m_bare, bare, _ = _run(name, None)
    m_watch, watch, seen = _run(name, WATCH)
    assert_bit_identical(snapshot(m_bare, bare), snapshot(m_watch, watch), f"{name} under a watch gate")
    fired = [i for i, m in enumerate(seen) if m["gated"] == 1.0]
    assert fired, "the spikes are far above the window: the rule fires"
    assert all(m["skipped"] == 0.0 and m["gated_steps"] == 0 for m in seen)  # nothing dropped
    assert seen[-1]["stopped_batches"] == len(fired)  # with watch: the steps on which the rule fired
    assert not watch.reuse_stopped


def test_watch_records_what_skip_would_have_decided():
    """Up to its first trip, a skip gate and a watch gate see the same steps: the same energies and statistics (to
    rounding: the watch gate runs the reference rule, the skip gate the C++ twin), and the watch gate fires exactly
    where the skip gate trips."""
    _, _, skip = _run("adamw_fused", SKIP)
    _, _, watch = _run("adamw_fused", WATCH)
    first = next(i for i, m in enumerate(skip) if m["gated"] == 1.0)
    for a, b in zip(skip[: first + 1], watch[: first + 1]):
        assert (a["energy"], a["gated"]) == (b["energy"], b["gated"])
        assert b["statistic"] == pytest.approx(a["statistic"], rel=1e-5, abs=1e-6)


@pytest.mark.parametrize("name", ["adamw_fused", "sgd_momentum", "rmsprop"])
def test_watch_never_syncs_even_on_the_host_path(name):
    model = make_model()
    opt = GatedOptimizer(OPTIMIZERS[name](model.parameters()), lm_head=model.lm_head, config=WATCH)
    loss_fn(model, batch(0)).backward()
    opt.set_reuse_index(1)
    opt.step()  # optimizer state allocation outside the recorded region
    opt.zero_grad()
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # and no host-path warning: nothing is read on the host
        with record_syncs() as rec:
            for k in (2, 3, 4):
                opt.set_reuse_index(k)
                loss_fn(model, batch(k), 1e3).backward()
                opt.step()
                opt.zero_grad()
    assert rec.events == [], rec.events


def test_watch_with_a_grad_scaler_is_the_scaled_bare_optimizer():
    m_bare, bare, _ = _run("adamw_fused", None, scaler=True)
    m_watch, watch, _ = _run("adamw_fused", WATCH, scaler=True)
    assert_bit_identical(snapshot(m_bare, bare), snapshot(m_watch, watch), "watch + GradScaler")


def test_passes_run_every_pass_under_watch():
    model = make_model()
    opt = GatedOptimizer(OPTIMIZERS["adamw_fused"](model.parameters()), lm_head=model.lm_head, config=WATCH)
    for b in range(5):
        ks = []
        for k in opt.passes():
            ks.append(k)
            loss_fn(model, batch(b), 1e3 if k == 3 else 1.0).backward()
            opt.step()
            opt.zero_grad()
        assert ks == [1, 2, 3, 4]
    assert opt.get_metrics()["stopped_batches"] >= 1  # the rule fired on some k = 3 spike


def test_watch_drift_gate_records_its_statistic():
    cfg = GateConfig(energy=False, drift="approx_kl", drift_threshold=1e-6, action="watch")
    model = make_model()
    opt = GatedOptimizer(OPTIMIZERS["adamw_fused"](model.parameters()), lm_head=None, config=cfg)
    for k in (1, 2):
        opt.set_reuse_index(k)
        logits = model(batch(0)[0])
        logp = torch.log_softmax(logits, -1)[:, 0]
        loss_fn(model, batch(0)).backward()
        opt.record_drift(**drift_stats(logp.detach(), logp.detach() - 0.1, torch.ones_like(logp)))
        opt.step()
        opt.zero_grad()
    m = opt.get_metrics()
    assert m["drift"] > 1e-6 and m["gated"] == 1.0 and m["skipped"] == 0.0 and not opt.reuse_stopped


def test_reference_rule_under_watch_leaves_skip_and_stopped_clear():
    st = GateState.create(2, "cpu")
    cfg = GateConfig(window=2, tau=0.5, action="watch")
    for e in (1.0, 1.1):
        gate_step_(st, torch.tensor(e), cfg)
    st.set_reuse_index(2)
    for _ in range(2):  # the rule fires on both reuse steps; nothing is skipped, the batch is not stopped
        assert gate_step_(st, torch.tensor(100.0), cfg).item() == 0.0
        assert st.last[2].item() == 1.0 and not st.stopped.item()
    assert st.counters.tolist() == [4, 0, 2]
    with pytest.raises(ValueError, match="runs 'reference'"):
        gate_step_(st, torch.tensor(1.0), cfg, impl="cpp")
