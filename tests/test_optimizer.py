"""GatedOptimizer: parity with the bare optimizer, exact skips, no host sync, and the Optimizer contract."""

from __future__ import annotations

import copy
import pickle
import warnings

import pytest
import torch

from dgg_fused import GateConfig, GatedOptimizer
from dgg_fused.skip import StepDecision
from dgg_fused.ops.reference import grad_sumsq_reference
from dgg_fused.testing import internals
from helpers import (
    FUSED,
    OPTIMIZERS,
    assert_bit_identical,
    batch,
    loss_fn,
    make_model,
    record_syncs,
    snapshot,
)

NEVER = GateConfig(window=2, tau=1e30)  # a gate that never trips
TRIP = GateConfig(window=3, tau=5.0, statistic="energy", reference="first_pass")
quiet_host_path = pytest.mark.filterwarnings("ignore:GatedOptimizer.*cannot skip")


def gated(name, model, config=NEVER, **kw):
    return GatedOptimizer(OPTIMIZERS[name](model.parameters()), lm_head=model.lm_head, config=config, **kw)


def train_step(model, opt, data_seed, scale=1.0):
    loss_fn(model, batch(data_seed), scale).backward()
    opt.step()
    opt.zero_grad()


def fill_window(model, opt, n=3, seed0=0):
    for b in range(n):
        opt.set_reuse_index(1)
        train_step(model, opt, seed0 + b)


# ---------------------------------------------------------------- parity: wrapped but never gated == bare
@quiet_host_path
@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_never_gated_matches_bare_exactly(name):
    m_bare, m_gated = make_model(), make_model()
    bare = OPTIMIZERS[name](m_bare.parameters())
    opt = gated(name, m_gated)
    schedule = [(b, k) for b in range(5) for k in (1, 2, 3, 4)]
    for i, (b, k) in enumerate(schedule):
        if i == 9:  # state_dict round trip mid-run, into fresh optimizers, on both sides
            sd_bare, sd_gated = bare.state_dict(), opt.state_dict()
            bare = OPTIMIZERS[name](m_bare.parameters())
            bare.load_state_dict(sd_bare)
            opt = gated(name, m_gated)
            opt.load_state_dict(sd_gated)
        opt.set_reuse_index(k)
        train_step(m_bare, bare, 10 * b + k)
        train_step(m_gated, opt, 10 * b + k)
        assert_bit_identical(snapshot(m_bare, bare), snapshot(m_gated, opt), f"{name} step {i}")
    assert opt.get_metrics()["gated_steps"] == 0


# ---------------------------------------------------------------- exact skip
@quiet_host_path
@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_gated_step_leaves_params_and_state_bit_identical(name):
    model = make_model()
    opt = gated(name, model, TRIP)
    fill_window(model, opt)
    opt.set_reuse_index(2)
    train_step(model, opt, 50)  # an ordinary reuse step: applied
    assert opt.get_metrics()["skipped"] == 0.0

    loss_fn(model, batch(51), scale=1e3).backward()  # energy x1e6: a spike
    before = snapshot(model, opt)
    opt.step()
    assert_bit_identical(before, snapshot(model, opt), f"{name}: gated step")
    m = opt.get_metrics()
    assert (m["gated"], m["skipped"], m["stopped_batches"]) == (1.0, 1.0, 1)
    assert opt.reuse_stopped

    # A loop that ignores reuse_stopped stays correct: every further step of the batch is skipped.
    opt.zero_grad()
    opt.set_reuse_index(3)
    loss_fn(model, batch(52)).backward()
    opt.step()
    assert_bit_identical(before, snapshot(model, opt), f"{name}: step on a stopped batch")
    assert opt.get_metrics()["gated_steps"] == 2 and opt.get_metrics()["stopped_batches"] == 1

    # The next batch starts clean.
    opt.zero_grad()
    opt.set_reuse_index(1)
    assert not opt.reuse_stopped
    train_step(model, opt, 53)
    after = snapshot(model, opt)
    assert not torch.equal(before[0]["lm_head.weight"], after[0]["lm_head.weight"])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_energy_is_float32_from_low_precision_grads(dtype):
    model = make_model().to(dtype)
    opt = GatedOptimizer(torch.optim.AdamW(model.parameters(), fused=True), lm_head=model.lm_head, config=NEVER)
    loss_fn(model, batch(0)).float().backward()
    g = model.lm_head.weight.grad
    opt.step()
    e = opt.metrics["energy"]
    assert e.dtype == torch.float32
    ref = grad_sumsq_reference([g], out_dtype=torch.float64)
    assert abs(e.item() - ref.item()) <= 1e-5 * ref.item()


def test_nonfinite_energy_trips_and_never_enters_window():
    model = make_model()
    opt = gated("adamw_fused", model, TRIP)
    fill_window(model, opt)
    window_before = internals(opt).gate.window.clone()
    opt.set_reuse_index(2)
    loss_fn(model, batch(7)).backward()
    model.lm_head.weight.grad[0, 0] = float("nan")
    before = snapshot(model, opt)
    opt.step()
    assert_bit_identical(before, snapshot(model, opt), "nan gradient")
    assert opt.reuse_stopped
    assert torch.equal(internals(opt).gate.window, window_before)
    assert torch.isfinite(internals(opt).gate.prev_energy)


def test_fused_sgd_first_step_skip_leaves_no_uninitialised_momentum():
    # torch's fused SGD allocates momentum buffers with empty_like on its first step; if that step is skipped
    # via found_inf they stay garbage. Force a trip on the optimizer's very first step (gate state restored
    # from a checkpoint with a full window) and check the step is exact and the next one equals a bare step.
    src_model = make_model()
    src = gated("sgd_momentum_fused", src_model, TRIP)
    fill_window(src_model, src)
    dgg_state = src.state_dict()["dgg"]

    model, ref_model = make_model(seed=1), make_model(seed=1)
    opt = gated("sgd_momentum_fused", model, TRIP)
    opt.load_state_dict({**opt.state_dict(), "dgg": dgg_state})
    ref = OPTIMIZERS["sgd_momentum_fused"](ref_model.parameters())
    opt.set_reuse_index(2)
    loss_fn(model, batch(3), scale=1e3).backward()
    before = snapshot(model, opt)
    opt.step()
    assert opt.get_metrics()["gated"] == 1.0
    assert_bit_identical(before, snapshot(model, opt), "first fused-SGD step gated")
    opt.zero_grad()
    opt.set_reuse_index(1)
    train_step(model, opt, 4)
    train_step(ref_model, ref, 4)
    assert_bit_identical(snapshot(ref_model, ref), snapshot(model, opt), "first real fused-SGD step")


# ---------------------------------------------------------------- no host sync
@pytest.mark.parametrize("name", sorted(FUSED))
def test_fused_path_step_never_syncs(name):
    model = make_model()
    opt = gated(name, model, TRIP)
    fill_window(model, opt)
    with record_syncs() as rec:
        opt.set_reuse_index(2)
        train_step(model, opt, 20)  # ordinary reuse step
        loss_fn(model, batch(21), scale=1e3).backward()
        opt.step()  # gated
        opt.zero_grad()
        opt.set_reuse_index(3)
        train_step(model, opt, 22)  # skipped: stopped batch
        opt.set_reuse_index(1)
        train_step(model, opt, 23)  # new batch
    assert rec.events == [], f"host syncs in step(): {rec.events}"
    assert opt.get_metrics()["stopped_batches"] == 1


def test_sync_recorder_catches_item_and_tolist():
    # The recorder must be able to fail: a naive gate is caught.
    with record_syncs() as rec:
        e = torch.ones(3).square().sum()
        if e.item() > 1:
            pass
        torch.ones(2).tolist()
        bool(torch.ones(()) > 0)
        torch.arange(4)[torch.arange(4) > 1]
    assert rec.events == [
        "aten::_local_scalar_dense",
        "Tensor.tolist",
        "aten::_local_scalar_dense",
        "aten::index(bool mask)",
    ]


def test_host_path_syncs_once_per_reuse_step_and_warns_once():
    # Non-fused torch optimizers sync on their own (e.g. Adam's bias correction reads `step` with .item());
    # count what the wrapper adds on top of the bare optimizer's own syncs.
    m_bare, model = make_model(), make_model()
    bare = OPTIMIZERS["adamw_foreach"](m_bare.parameters())
    opt = gated("adamw_foreach", model, TRIP)
    with pytest.warns(UserWarning, match="one device sync per reuse-pass step"):
        fill_window(model, opt)
    for b in range(3):
        train_step(m_bare, bare, b)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # warned once only
        for k, extra in ((1, []), (2, ["aten::_local_scalar_dense"])):  # k == 1 cannot trip: no sync
            with record_syncs() as rec_bare:
                train_step(m_bare, bare, 30 + k)
            with record_syncs() as rec:
                opt.set_reuse_index(k)
                train_step(model, opt, 30 + k)
            assert sorted(rec.events) == sorted(rec_bare.events + extra), k


def test_skip_mode_found_inf_requires_a_fused_optimizer():
    model = make_model()
    with pytest.raises(ValueError, match="found_inf"):
        gated("adamw_foreach", model, skip_mode="found_inf")
    gated("adamw_fused", model, skip_mode="found_inf")


@quiet_host_path
def test_skip_mode_host_is_exact_with_a_fused_optimizer():
    model = make_model()
    opt = gated("adamw_fused", model, TRIP, skip_mode="host")
    assert not opt._step_supports_amp_scaling
    fill_window(model, opt)
    opt.set_reuse_index(2)
    loss_fn(model, batch(5), scale=1e3).backward()
    before = snapshot(model, opt)
    opt.step()
    assert_bit_identical(before, snapshot(model, opt), "host-mode gated step")


# ---------------------------------------------------------------- the Optimizer contract
def test_lr_scheduler_survives_accelerate_style_round_trip():
    model = make_model()
    inner = torch.optim.AdamW(model.parameters(), lr=1.0, fused=True)
    opt = GatedOptimizer(inner, lm_head=model.lm_head)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 ** (s + 1))
    # What accelerate's AcceleratedOptimizer does at prepare time: state_dict() -> load_state_dict().
    opt.load_state_dict(opt.state_dict())
    assert opt.param_groups is inner.param_groups
    for i in range(3):
        train_step(model, opt, i)
        sched.step()
        assert inner.param_groups[0]["lr"] == pytest.approx(0.5 ** (i + 2))


def test_accelerate_prepare_keeps_scheduled_lr_reaching_inner():
    accelerate = pytest.importorskip("accelerate")
    model = make_model()
    inner = torch.optim.AdamW(model.parameters(), lr=1.0, fused=True)
    opt = GatedOptimizer(inner, lm_head=model.lm_head)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 ** (s + 1))
    acc = accelerate.Accelerator(cpu=True)
    model, aopt, asched = acc.prepare(model, opt, sched)
    assert aopt.optimizer is opt
    for i in range(3):
        acc.backward(loss_fn(model, batch(i)))
        aopt.step()
        asched.step()
        aopt.zero_grad()
        assert inner.param_groups[0]["lr"] == pytest.approx(0.5 ** (i + 2))
    assert opt.get_metrics()["steps"] == 3


def test_grad_scaler_unscaled_energy_and_parity():
    def run(wrap):
        model = make_model()
        inner = torch.optim.AdamW(model.parameters(), lr=1e-2, fused=True)
        opt = GatedOptimizer(inner, lm_head=model.lm_head, config=NEVER) if wrap else inner
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
        energies = []
        for i in range(4):
            if wrap:
                opt.set_reuse_index(1 + i % 2)
            scaler.scale(loss_fn(model, batch(i))).backward()
            unscaled = grad_sumsq_reference([model.lm_head.weight.grad], out_dtype=torch.float64) / scaler.get_scale() ** 2
            scaler.step(opt)
            scaler.update()
            if wrap:
                energies.append((opt.get_metrics()["energy"], unscaled.item()))
            opt.zero_grad()
        return snapshot(model, inner), energies

    (bare, _), (wrapped, energies) = run(False), run(True)
    assert_bit_identical(bare, wrapped, "GradScaler parity")
    for got, want in energies:
        assert got == pytest.approx(want, rel=1e-5)


def test_grad_scaler_overflow_is_not_a_trip():
    model = make_model()
    opt = gated("adamw_fused", model, TRIP)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    for b in range(3):
        opt.set_reuse_index(1)
        scaler.scale(loss_fn(model, batch(b))).backward()
        scaler.step(opt)
        scaler.update()
        opt.zero_grad()
    opt.set_reuse_index(2)
    scaler.scale(loss_fn(model, batch(9))).backward()
    model.lm_head.weight.grad[0, 0] = float("inf")
    before = snapshot(model, opt)
    scaler.step(opt)
    scaler.update()
    assert_bit_identical(before, snapshot(model, opt), "scaler overflow")
    m = opt.get_metrics()
    assert m["gated"] == 0.0 and m["stopped_batches"] == 0 and not opt.reuse_stopped
    assert scaler.get_scale() == 2.0**9


def test_step_hooks_closure_zero_grad_and_add_param_group():
    model = make_model()
    opt = GatedOptimizer(torch.optim.AdamW(model.parameters(), fused=True), lm_head=model.lm_head)
    calls = []
    opt.register_step_pre_hook(lambda o, a, k: calls.append(("pre", o is opt)))
    opt.register_step_post_hook(lambda o, a, k: calls.append(("post", o is opt)))

    def closure():
        opt.zero_grad()
        loss = loss_fn(model, batch(0))
        loss.backward()
        return loss

    loss = opt.step(closure)
    assert isinstance(loss, torch.Tensor)
    assert calls == [("pre", True), ("post", True)]
    loss_fn(model, batch(1)).backward()
    opt.zero_grad(set_to_none=False)
    assert torch.count_nonzero(model.lm_head.weight.grad) == 0
    extra = torch.nn.Parameter(torch.zeros(3))
    opt.add_param_group({"params": [extra]})
    assert opt.param_groups[-1]["params"][0] is extra
    assert len(opt.optimizer.param_groups) == 2
    assert "GatedOptimizer" in repr(opt)


def test_passes_iterator_stops_when_the_gate_trips():
    model = make_model()
    opt = gated("adamw_fused", model, TRIP)
    fill_window(model, opt)
    seen = []
    for k in opt.passes():
        seen.append(k)
        loss_fn(model, batch(k), scale=1e3 if k == 2 else 1.0).backward()
        opt.step()
        opt.zero_grad()
    assert seen == [1, 2]
    assert list(opt.passes(max_reuse=2)) == [1, 2]  # the next batch starts again at k = 1


# ---------------------------------------------------------------- bad input: clear errors, nothing changed
def test_bad_construction_arguments():
    model = make_model()
    other = make_model(seed=5)
    inner = torch.optim.AdamW(model.parameters(), fused=True)
    with pytest.raises(ValueError, match="not among the optimizer's parameters"):
        GatedOptimizer(inner, lm_head=other.lm_head)
    for bad in ("lm_head", 3, {"w": model.lm_head.weight}):
        with pytest.raises(TypeError, match="lm_head="):
            GatedOptimizer(inner, lm_head=bad)
    with pytest.raises(TypeError, match="must hold Parameters"):
        GatedOptimizer(inner, lm_head=[model.lm_head.weight, "bias"])
    with pytest.raises(ValueError, match="no parameters"):
        GatedOptimizer(inner, lm_head=[])
    with pytest.raises(TypeError, match="torch.optim.Optimizer"):
        GatedOptimizer(object(), lm_head=model.lm_head)
    with pytest.raises(TypeError, match="already a GatedOptimizer"):
        GatedOptimizer(GatedOptimizer(inner, lm_head=model.lm_head), lm_head=model.lm_head)
    with pytest.raises(TypeError, match="LBFGS"):
        GatedOptimizer(torch.optim.LBFGS(model.parameters()), lm_head=model.lm_head)
    with pytest.raises(TypeError, match="GateConfig"):
        GatedOptimizer(inner, lm_head=model.lm_head, config={"tau": 1})
    with pytest.raises(ValueError, match="skip_mode"):
        GatedOptimizer(inner, lm_head=model.lm_head, skip_mode="sometimes")
    frozen = make_model()
    frozen.lm_head.weight.requires_grad_(False)
    with pytest.raises(ValueError, match="does not require grad"):
        GatedOptimizer(torch.optim.AdamW(frozen.parameters()), lm_head=frozen.lm_head)
    # the accepted forms
    GatedOptimizer(inner, lm_head=model.lm_head.weight)
    GatedOptimizer(inner, lm_head=[model.lm_head.weight, model.lm_head.weight])


def test_step_without_lm_head_grad_raises_and_changes_nothing():
    model = make_model()
    opt = gated("adamw_fused", model)
    model.mlp[0].weight.grad = torch.ones_like(model.mlp[0].weight)
    before = snapshot(model, opt), internals(opt).gate.state_dict()
    with pytest.raises(RuntimeError, match="no .grad"):
        opt.step()
    assert_bit_identical(before[0], snapshot(model, opt))
    for k, v in before[1].items():
        torch.testing.assert_close(v, getattr(internals(opt).gate, k), rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("k", [0, 5, -1, 2.0, True])
def test_bad_reuse_index(k):
    model = make_model()
    opt = gated("adamw_fused", model)
    with pytest.raises((ValueError, TypeError)):
        opt.set_reuse_index(k)
    assert opt.reuse_index == 1


# ---------------------------------------------------------------- edge defects (issue 9) and small items
@quiet_host_path  # torch's deep copy of a fused AdamW drops its amp-scaling flag: the copy takes the host path
@pytest.mark.filterwarnings("ignore:GatedOptimizer.step.. with max_reuse")
def test_deepcopy_and_pickle_after_an_lr_scheduler_step_the_copy():
    """D1: the scheduler patches step() on the instance; a copy must step itself, and pickling must work."""
    model = make_model()
    opt = gated("adamw_fused", model)
    torch.optim.lr_scheduler.StepLR(opt, step_size=1)
    assert "step" in opt.__dict__  # torch's scheduler patched the instance
    twin = copy.deepcopy(opt)
    assert "step" not in twin.__dict__
    loss_fn(model, batch(0)).backward()
    before = [p.detach().clone() for p in model.parameters()]
    twin_params = [p for g in twin.param_groups for p in g["params"]]
    for p, q in zip(twin_params, model.parameters()):
        p.grad = q.grad.clone()
    twin.step()
    assert all(torch.equal(a, p) for a, p in zip(before, model.parameters())), "the copy stepped the original"
    assert twin.get_metrics()["steps"] == 1 and opt.get_metrics()["steps"] == 0
    restored = pickle.loads(pickle.dumps(opt))
    assert restored.config == opt.config and restored.get_metrics() == opt.get_metrics()
    clipping = gated("adamw_fused", model, max_grad_norm=1.0)  # a cached clip plan and a recorded energy
    clipping.set_reuse_index(1)
    clipping.step()
    clipping.record_energy()
    for o in (copy.deepcopy(clipping), pickle.loads(pickle.dumps(clipping))):
        assert o.max_grad_norm == 1.0 and internals(o).meter.pending is None


def test_config_is_read_only():
    """D2: assigning a config had no effect on the gate and broke checkpoints; it now raises."""
    model = make_model()
    opt = gated("adamw_fused", model, TRIP)
    sd = opt.state_dict()
    with pytest.raises(AttributeError, match="read-only"):
        opt.config = GateConfig(window=7)
    assert opt.config == TRIP and opt.state_dict()["dgg"]["config"] == sd["dgg"]["config"]


def test_scaler_overflow_on_the_first_fused_sgd_step_leaves_no_uninitialised_momentum():
    """D4: a GradScaler overflow on the very first fused-SGD-with-momentum step is decided on the host (torch's
    fused SGD would allocate its momentum uninitialised on a skipped first step); afterwards the run equals a bare
    fused SGD that never saw the overflowed step (the scaler halved its scale: the bare run starts at half)."""
    def run(wrap):
        model = make_model()
        inner = torch.optim.SGD(model.parameters(), lr=1e-2, momentum=0.9, fused=True)
        opt = GatedOptimizer(inner, lm_head=model.lm_head, config=NEVER) if wrap else inner
        scaler = torch.amp.GradScaler("cpu", init_scale=4.0 if wrap else 2.0)
        for step in range(0 if wrap else 1, 4):
            if wrap:
                opt.set_reuse_index(step % 2 + 1)
            scaler.scale(loss_fn(model, batch(step))).backward()
            if step == 0:
                model.mlp[0].weight.grad[0, 0] = float("inf")
            scaler.step(opt)
            scaler.update()
            opt.zero_grad()
        return model, inner

    m_g, o_g = run(True)
    m_b, o_b = run(False)
    for p in m_g.parameters():
        assert torch.isfinite(p).all() and torch.isfinite(o_g.state[p]["momentum_buffer"]).all()
    assert_bit_identical(snapshot(m_g, o_g), snapshot(m_b, o_b), "gated vs bare fused SGD")


def test_warns_once_when_set_reuse_index_is_never_called():
    model = make_model()
    opt = gated("adamw_fused", model)
    with pytest.warns(UserWarning, match="set_reuse_index"):
        train_step(model, opt, 0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        train_step(model, opt, 1)  # once
        solo = make_model()
        o1 = GatedOptimizer(torch.optim.AdamW(solo.parameters(), fused=True), lm_head=solo.lm_head,
                            config=GateConfig(max_reuse=1))
        train_step(solo, o1, 0)  # max_reuse=1: nothing to warn about


def test_nested_passes_raise_and_numpy_reuse_index_is_accepted():
    np = pytest.importorskip("numpy")
    model = make_model()
    opt = gated("adamw_fused", model)
    outer = opt.passes(2)
    assert next(outer) == 1
    assert list(opt.passes()) == [1, 2, 3, 4]  # a later passes() supersedes the earlier one ...
    with pytest.raises(RuntimeError, match="superseded.*nested"):
        next(outer)  # ... and resuming the superseded (outer) loop is the error
    opt.set_reuse_index(np.int64(3))
    assert opt.reuse_index == 3 and type(opt.reuse_index) is int
    assert list(opt.passes(np.int64(1))) == [1]


def test_an_abandoned_passes_iterator_does_not_break_the_next_batch():
    """Regression (issue 17, edge 7): `it = opt.passes(); for k in it: ... break` used to leave the optimizer
    "already iterating", so the next batch's passes() raised although nothing was nested."""
    model = make_model()
    opt = gated("adamw_fused", model)
    it = opt.passes()
    for k in it:
        train_step(model, opt, k)
        break
    assert [k for k in opt.passes()] == [1, 2, 3, 4]  # the next batch: every pass
    assert opt.reuse_index == 4


def test_step_hooks_run_once_per_step_and_torch_never_wraps_the_step_again():
    """The wrapper runs its own step hooks around the whole gated step, torch's global hooks run once (around the
    inner step, when it runs); torch's own re-patching (as Optimizer.__setstate__ does) must not wrap step twice.
    The set-up of torch.optim.Optimizer.__init__ is read from this torch, not written by hand."""
    model = make_model()
    opt = gated("adamw_fused", model)
    probe = torch.optim.SGD([torch.zeros(1, requires_grad=True)])
    missing = {k for k in vars(probe) if k not in ("param_groups", "state", "defaults")} - set(vars(opt))
    assert not missing, f"torch.optim.Optimizer.__init__ sets {missing}, the wrapper does not"
    calls = []
    opt.register_step_pre_hook(lambda o, a, k: calls.append("pre"))
    from torch.optim.optimizer import register_optimizer_step_pre_hook

    h = register_optimizer_step_pre_hook(lambda o, a, k: calls.append(type(o).__name__))
    try:
        torch.optim.Optimizer._patch_step_function(opt)  # what torch does when it (re)builds an optimizer
        opt.set_reuse_index(1)
        train_step(model, opt, 0)
    finally:
        h.remove()
    assert calls == ["pre", "AdamW"], calls


# ---------------------------------------------------------------- the warm-up made visible
@pytest.mark.parametrize("config,key,expect", [
    (GateConfig(window=3), "window_filled", [1, 1, 2, 3, 3]),  # first-pass energies only: k=2 steps don't count
    (GateConfig(window=3, statistic="both"), "window_filled", [0, 0, 1, 2, 2]),  # the increment row: a step later
    (GateConfig(window=3, energy=False, drift="approx_kl"), None, None),  # a threshold needs no window: no count
    (GateConfig(window=3, energy=False, drift="approx_kl", drift_rule="zscore"), "drift_window_filled",
     [1, 1, 2, 3, 3]),
])
def test_window_filled_metric_counts_the_rules_window(config, key, expect):
    model = make_model()
    opt = GatedOptimizer(torch.optim.AdamW(model.parameters(), fused=True), lm_head=model.lm_head, config=config)
    got = []
    for k in (1, 2, 1, 1, 2):
        opt.set_reuse_index(k)
        loss_fn(model, batch(len(got))).backward()
        opt.record_drift(approx_kl=torch.tensor(0.01 * (1 + len(got))))
        opt.step()
        opt.zero_grad()
        m = opt.get_metrics()
        assert m.keys() == opt.metrics.keys()
        assert {"window_filled", "drift_window_filled"} & m.keys() == ({key} if key else set())
        if key:
            assert opt.metrics[key].item() == m[key]
            got.append(m[key])
    assert got == (expect or [])


def test_decide_is_the_gates_half_of_step():
    """decide_() updates the gate and returns the inner step's found_inf without touching a parameter; applying it
    to the inner optimizer equals step() bit for bit (how the DeepSpeed mode applies one decision per group)."""
    m_a, m_b = make_model(), make_model()
    a, b = gated("adamw_fused", m_a, TRIP), gated("adamw_fused", m_b, TRIP)
    for i, (k, scale) in enumerate([(1, 1.0), (1, 1.0), (1, 1.0), (2, 1.0), (1, 1.0), (2, 1e3)]):
        for opt, m in ((a, m_a), (b, m_b)):
            opt.set_reuse_index(k)
            loss_fn(m, batch(i), scale).backward()
        a.step()
        before = snapshot(m_b, b)
        d = b.decide_()
        assert_bit_identical(before, snapshot(m_b, b), "decide_ touched the model")
        assert d.run_inner and torch.equal(d.found_inf, b.metrics["skipped"])
        b.optimizer.found_inf = d.found_inf
        b.optimizer.step()
        del b.optimizer.found_inf
        a.zero_grad()
        b.zero_grad()
        assert_bit_identical(snapshot(m_a, a), snapshot(m_b, b), f"step {i}")
    assert a.get_metrics() == b.get_metrics() and a.get_metrics()["gated_steps"] == 1


# ---------------------------------------------------------------- copies, settings, construction (issue 17 edges)
@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
def test_a_copy_of_a_fused_optimizer_stays_on_the_sync_free_path(how):
    """Regression (issue 17, edge 2): torch drops _step_supports_amp_scaling from a copied optimizer, and the copy
    left the sync-free path: a host sync per reuse step, a "without fused=True" warning, fold_clip ignored (the
    gradients multiplied: other bits) and the energy hook's measurement never used."""
    model = make_model(bias=True)
    opt = GatedOptimizer(OPTIMIZERS["adamw_fused"](model.parameters()), lm_head=model.lm_head, config=TRIP,
                         max_grad_norm=0.05, fold_clip=True, energy_hook=True)
    fill_window(model, opt)
    c = copy.deepcopy(opt) if how == "deepcopy" else pickle.loads(pickle.dumps(opt))
    assert c.plan == opt.plan and c.plan.skip_path == "found_inf" and c._step_supports_amp_scaling and c.energy_hook
    orig, mine = ([p for g in o.param_groups for p in g["params"]] for o in (opt, c))
    names = [n for n, _ in model.named_parameters()]
    for k, scale in ((2, 1.0), (3, 1e3)):  # a clipped reuse step (applied), then a spike (gated)
        for o, ps in ((opt, orig), (c, mine)):
            o.set_reuse_index(k)
            ids, tgt = batch(40 + k)
            logits = torch.func.functional_call(model, dict(zip(names, ps)), (ids,))
            (torch.nn.functional.cross_entropy(logits, tgt) * scale).backward()  # the hooks measure
        measured = []
        meter = internals(c).meter
        meter.measure = lambda *a, _m=meter.measure, **kw: (measured.append(1), _m(*a, **kw))[1]
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # no "without fused=True" warning
            with record_syncs() as rec:
                c.step()
        del meter.measure
        opt.step()
        assert rec.events == [], rec.events
        assert measured == []  # the hook's measurement was the step's (and the clip reused it)
        assert all(torch.equal(p, q) for p, q in zip(orig, mine))  # folded like the original: same bits
        assert c.get_metrics() == opt.get_metrics()
        assert c.get_metrics()["gated"] == float(scale > 1)
        opt.zero_grad()
        c.zero_grad()


def test_settings_are_validated_after_construction_too():
    """Regression (issue 17, edge 3): max_grad_norm = -1.0 (flips every gradient's sign) or 0.0 (zeroes every
    update) and skip_mode = "bogus" were accepted after construction."""
    model = make_model()
    opt = gated("adamw_fused", model, max_grad_norm=1.0)
    for bad in (-1.0, 0.0, float("inf"), float("nan"), "1.0"):
        with pytest.raises(ValueError, match="max_grad_norm"):
            opt.max_grad_norm = bad
    assert opt.max_grad_norm == 1.0
    opt.max_grad_norm = 2  # a valid change is taken (as a float)
    assert opt.max_grad_norm == 2.0 and isinstance(opt.max_grad_norm, float)
    opt.max_grad_norm = None
    with pytest.raises(AttributeError, match="skip_mode is read-only"):
        opt.skip_mode = "bogus"
    with pytest.raises(TypeError, match="fold_clip"):
        opt.fold_clip = 1
    assert opt.skip_mode == "auto" and opt.fold_clip is False


def test_an_unavailable_backend_raises_at_construction_even_for_a_drift_only_clip():
    """Regression (issue 17, edge 9): a drift-only gate with max_grad_norm and backend="cuda" on a CPU model
    constructed and failed at the first step()."""
    if torch.cuda.is_available():
        pytest.skip("needs a machine without CUDA")
    model = make_model()
    cfg = GateConfig(energy=False, drift="approx_kl")
    for kw in ({"max_grad_norm": 1.0}, {}):
        with pytest.raises(RuntimeError, match="not available for cpu"):
            GatedOptimizer(OPTIMIZERS["adamw_fused"](model.parameters()), lm_head=None, config=cfg, backend="cuda", **kw)
    opt = GatedOptimizer(OPTIMIZERS["adamw_fused"](model.parameters()), lm_head=None, config=cfg)
    opt.max_grad_norm = 1.0  # "auto" resolves on every device


# ---------------------------------------------------------------- the public seam: decide_ / apply_
@quiet_host_path
@pytest.mark.parametrize("name", ["adamw_fused", "sgd_momentum_fused", "adamw_foreach"])
def test_decide_then_apply_is_step_bit_for_bit(name):
    """step() is decide_() then apply_(): an engine using the seam gets exactly the plain step, trips included; an
    energy handed to decide_(energy=) acts like record_energy(energy=) before step()."""
    runs = []
    for seam in (False, True):
        model = make_model()
        opt = gated(name, model, TRIP, max_grad_norm=0.5)
        metrics = []
        for b in range(4):
            for k in (1, 2, 3):
                opt.set_reuse_index(k)
                loss_fn(model, batch(10 * b + k), 1e3 if (b, k) == (3, 2) else 1.0).backward()
                e = internals(opt).meter.measure().total() * (2.0 if b == 2 else 1.0)
                if seam:
                    d = opt.decide_(energy=e)
                    assert isinstance(d, StepDecision)
                    opt.apply_(d)
                else:
                    opt.record_energy(energy=e)
                    opt.step()
                metrics.append(opt.get_metrics())
                opt.zero_grad()
        runs.append((snapshot(model, opt), metrics))
    assert_bit_identical(runs[0][0], runs[1][0], f"{name}: seam vs step")
    assert runs[0][1] == runs[1][1] and any(m["gated"] for m in runs[0][1])


def test_decide_once_apply_many_and_the_step_hooks_run_once():
    """What the DeepSpeed mode does: one decision per training step, inside step_hooks(), applied to several inner
    calls (here: twice; a skipped decision stays skipped on every call)."""
    model = make_model()
    opt = gated("adamw_fused", model, TRIP)
    fill_window(model, opt)
    calls = []
    opt.register_step_pre_hook(lambda o, a, kw: calls.append("pre"))
    opt.register_step_post_hook(lambda o, a, kw: calls.append("post"))
    opt.set_reuse_index(2)
    loss_fn(model, batch(9), 1e3).backward()
    before = snapshot(model, opt)
    with opt.step_hooks():
        d = opt.decide_()
    opt.apply_(d)
    opt.apply_(d)
    assert calls == ["pre", "post"]
    assert_bit_identical(before, snapshot(model, opt), "a skipped decision applied twice")
    with pytest.raises(ValueError, match="reads no lm_head energy"):
        GatedOptimizer(OPTIMIZERS["adamw_fused"](model.parameters()), lm_head=None,
                       config=GateConfig(energy=False, drift="approx_kl")).decide_(energy=torch.tensor(1.0))
