"""GatedOptimizer: parity with the bare optimizer, exact skips, no host sync, and the Optimizer contract."""

from __future__ import annotations

import io
import warnings

import pytest
import torch

from dgg_fused import GateConfig, GatedOptimizer
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
    ref = g.double().square().sum()
    assert abs(e.item() - ref.item()) <= 1e-5 * ref.item()


def test_nonfinite_energy_trips_and_never_enters_window():
    model = make_model()
    opt = gated("adamw_fused", model, TRIP)
    fill_window(model, opt)
    window_before = opt._gate.window.clone()
    opt.set_reuse_index(2)
    loss_fn(model, batch(7)).backward()
    model.lm_head.weight.grad[0, 0] = float("nan")
    before = snapshot(model, opt)
    opt.step()
    assert_bit_identical(before, snapshot(model, opt), "nan gradient")
    assert opt.reuse_stopped
    assert torch.equal(opt._gate.window, window_before)
    assert torch.isfinite(opt._gate.prev_energy)


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


# ---------------------------------------------------------------- checkpoints
def _run(model, opt, schedule):
    for b, k, scale in schedule:
        opt.set_reuse_index(k)
        loss_fn(model, batch(b * 10 + k), scale).backward()
        opt.step()
        opt.zero_grad()


@quiet_host_path
@pytest.mark.parametrize("name", ["adamw_fused", "adam_amsgrad", "sgd_momentum_fused"])
def test_resume_mid_run_is_bit_exact(name):
    schedule = [(b, k, 1e3 if (b, k) in {(3, 2), (5, 3)} else 1.0) for b in range(7) for k in (1, 2, 3)]
    cut = 11
    m_full = make_model()
    o_full = gated(name, m_full, TRIP)
    _run(m_full, o_full, schedule)

    m1 = make_model()
    o1 = gated(name, m1, TRIP)
    _run(m1, o1, schedule[:cut])
    buf = io.BytesIO()
    torch.save({"model": m1.state_dict(), "opt": o1.state_dict()}, buf)
    buf.seek(0)
    ckpt = torch.load(buf, weights_only=True)
    m2 = make_model(seed=123)  # different init: everything must come from the checkpoint
    m2.load_state_dict(ckpt["model"])
    o2 = gated(name, m2, TRIP)
    o2.load_state_dict(ckpt["opt"])
    assert o2.reuse_index == o1.reuse_index
    _run(m2, o2, schedule[cut:])

    assert_bit_identical(snapshot(m_full, o_full), snapshot(m2, o2), f"{name} resumed")
    assert o_full.get_metrics() == o2.get_metrics()
    assert o_full.get_metrics()["stopped_batches"] == 2


def test_load_state_dict_rejects_bad_gate_state_and_changes_nothing():
    model = make_model()
    opt = gated("adamw_fused", model, TRIP)
    fill_window(model, opt)
    good = opt.state_dict()
    before = snapshot(model, opt), {k: v.clone() for k, v in opt._gate.tensors().items()}
    bad_window = {**good, "dgg": {**good["dgg"], "config": {**good["dgg"]["config"], "window": 5}}}
    with pytest.raises(ValueError, match="window"):
        opt.load_state_dict(bad_window)
    bad_tensor = {**good, "dgg": {**good["dgg"], "gate": {**good["dgg"]["gate"], "window": torch.zeros(2, 4)}}}
    with pytest.raises(ValueError, match="window"):
        opt.load_state_dict(bad_tensor)
    bad_k = {**good, "dgg": {**good["dgg"], "reuse_index": 9}}
    with pytest.raises(ValueError, match="reuse_index"):
        opt.load_state_dict(bad_k)
    after = snapshot(model, opt), {k: v.clone() for k, v in opt._gate.tensors().items()}
    assert_bit_identical(before[0], after[0])
    for k in before[1]:
        torch.testing.assert_close(before[1][k], after[1][k], rtol=0, atol=0, equal_nan=True)


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
            unscaled = model.lm_head.weight.grad.double().square().sum() / scaler.get_scale() ** 2
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
    before = snapshot(model, opt), opt._gate.state_dict()
    with pytest.raises(RuntimeError, match="no .grad"):
        opt.step()
    assert_bit_identical(before[0], snapshot(model, opt))
    for k, v in before[1].items():
        torch.testing.assert_close(v, getattr(opt._gate, k), rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("k", [0, 5, -1, 2.0, True])
def test_bad_reuse_index(k):
    model = make_model()
    opt = gated("adamw_fused", model)
    with pytest.raises((ValueError, TypeError)):
        opt.set_reuse_index(k)
    assert opt.reuse_index == 1
