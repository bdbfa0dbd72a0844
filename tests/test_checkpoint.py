"""dgg_fused.checkpoint: resume bit-exactly from ``state_dict()`` (``weights_only=True``), and a bad or inconsistent
checkpoint raises and changes nothing (shapes, dtypes and values of the gate state)."""

from __future__ import annotations

import dataclasses
import io

import pytest
import torch

from dgg_fused.checkpoint import WindowMismatch
from dgg_fused.testing import internals
from helpers import assert_bit_identical, batch, loss_fn, make_model, snapshot
from test_optimizer import TRIP, fill_window, gated, quiet_host_path, train_step  # noqa: F401


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
    before = snapshot(model, opt), {k: v.clone() for k, v in internals(opt).gate.tensors().items()}
    bad_window = {**good, "dgg": {**good["dgg"], "config": {**good["dgg"]["config"], "window": 5}}}
    with pytest.raises(ValueError, match="window"):
        opt.load_state_dict(bad_window)
    bad_tensor = {**good, "dgg": {**good["dgg"], "gate": {**good["dgg"]["gate"], "window": torch.zeros(2, 4)}}}
    with pytest.raises(ValueError, match="window"):
        opt.load_state_dict(bad_tensor)
    bad_k = {**good, "dgg": {**good["dgg"], "reuse_index": 9}}
    with pytest.raises(ValueError, match="reuse_index"):
        opt.load_state_dict(bad_k)
    after = snapshot(model, opt), {k: v.clone() for k, v in internals(opt).gate.tensors().items()}
    assert_bit_identical(before[0], after[0])
    for k in before[1]:
        torch.testing.assert_close(before[1][k], after[1][k], rtol=0, atol=0, equal_nan=True)


def test_a_changed_window_says_how_to_resume_or_start_the_gate_fresh():
    """Issue 18, edge 6: the error names both ways out, and both work."""
    model = make_model()
    opt = gated("adamw_fused", model, TRIP)  # window 3
    fill_window(model, opt)
    sd = opt.state_dict()
    other = gated("adamw_fused", model, dataclasses.replace(TRIP, window=8))
    with pytest.raises(WindowMismatch, match=r"window is 3, this optimizer's is 8: build the optimizer with "
                                             r"GateConfig\(window=3\).*without its 'dgg' entry") as err:
        other.load_state_dict(sd)
    assert isinstance(err.value, ValueError) and (err.value.saved, err.value.current) == (3, 8)
    other.load_state_dict({k: v for k, v in sd.items() if k != "dgg"})  # fresh gate, inner state resumed
    assert other.get_metrics()["steps"] == 0 and other.state_dict()["state"].keys() == sd["state"].keys()
    same = gated("adamw_fused", model, TRIP)
    same.load_state_dict(sd)
    assert same.get_metrics() == opt.get_metrics()


def _assert_unchanged(opt, model, before):
    after = snapshot(model, opt), {k: v.clone() for k, v in internals(opt).gate.tensors().items()}
    assert_bit_identical(before[0], after[0])
    for k in before[1]:
        torch.testing.assert_close(before[1][k], after[1][k], rtol=0, atol=0, equal_nan=True, msg=k)


@pytest.mark.parametrize(
    "key,value,match",
    [
        ("filled", torch.tensor([99, -5]), "filled"),
        ("filled", torch.tensor([4, 0]), "filled"),  # window is 3
        ("counters", torch.tensor([5, 7, 1]), "counters"),  # more gated steps than steps
        ("counters", torch.tensor([-1, 0, 0]), "counters"),
        ("skip", torch.tensor(0.5), "skip"),
        ("reuse_index", torch.tensor(0), "reuse_index"),
        ("drift_filled", torch.tensor(7), "drift_filled"),
        ("window", torch.full((2, 3), float("nan")), "non-finite"),
    ],
)
def test_gate_values_are_validated_and_a_bad_one_changes_nothing(key, value, match):
    """D6: values, not only shapes and dtypes, are checked before anything is written."""
    model = make_model()
    opt = gated("adamw_fused", model, TRIP)
    fill_window(model, opt)
    good = opt.state_dict()
    before = snapshot(model, opt), {k: v.clone() for k, v in internals(opt).gate.tensors().items()}
    bad = {**good, "dgg": {**good["dgg"], "gate": {**good["dgg"]["gate"], key: value}}}
    with pytest.raises(ValueError, match=match):
        opt.load_state_dict(bad)
    _assert_unchanged(opt, model, before)


def test_gate_reuse_index_must_agree_with_the_saved_one():
    """D6: a gate reuse_index that disagrees with the saved one would let the host path apply a step the gate
    skipped; such a checkpoint is rejected."""
    model = make_model()
    opt = gated("adamw_fused", model, TRIP)
    fill_window(model, opt)
    opt.set_reuse_index(2)
    good = opt.state_dict()
    assert good["dgg"]["reuse_index"] == 2
    before = snapshot(model, opt), {k: v.clone() for k, v in internals(opt).gate.tensors().items()}
    bad = {**good, "dgg": {**good["dgg"], "gate": {**good["dgg"]["gate"], "reuse_index": torch.tensor(3)}}}
    with pytest.raises(ValueError, match="inconsistent"):
        opt.load_state_dict(bad)
    _assert_unchanged(opt, model, before)
    opt.load_state_dict(good)  # the consistent one loads
    assert opt.reuse_index == 2 and internals(opt).gate.reuse_index.item() == 2


def test_a_checkpoint_with_settings_now_refused_still_loads():
    """GateConfig refuses settings the rule never reads; a checkpoint written before that check (its config dict
    holds one) still loads: the saved settings are only compared, with a warning, never rebuilt."""
    import warnings

    from dgg_fused import GateConfig, GatedOptimizer

    model = make_model()
    cfg = GateConfig(energy=False, drift="approx_kl")
    opt = GatedOptimizer(torch.optim.AdamW(model.parameters(), fused=True), lm_head=None, config=cfg)
    sd = opt.state_dict()
    sd["dgg"]["config"] = {**sd["dgg"]["config"], "tau": 0.5}  # a drift-only threshold gate with a tau
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        opt.load_state_dict(sd)
    assert any("keeping the current" in str(w.message) for w in caught)


@pytest.mark.parametrize(
    "edit,match",
    [
        ({"window": torch.tensor([[-1.0, 2.0, 3.0], [0.0, 0.0, 0.0]])}, "negative"),  # an energy below 0
        ({"prev_energy": torch.tensor(-2.0)}, "prev_energy"),
        ({"prev_energy": torch.tensor(float("inf"))}, "prev_energy"),
        ({"stopped": torch.tensor(True)}, "stopped.*reuse_index 1"),  # saved at k = 1: a new batch is unstopped
        ({"drift_window": torch.tensor([0.1, float("nan"), 0.2]), "drift_filled": torch.tensor(3)}, "drift_window"),
    ],
)
def test_impossible_gate_states_are_refused(edit, match):
    """Regression (issue 17, edge 4): these loaded; with a NaN in the drift window the drift Z gate never
    tripped again."""
    from dgg_fused import GateConfig, GatedOptimizer

    model = make_model()
    cfg = GateConfig(window=3, drift="approx_kl", drift_rule="zscore")
    opt = GatedOptimizer(torch.optim.AdamW(model.parameters(), fused=True), lm_head=model.lm_head, config=cfg)
    opt.set_reuse_index(1)
    good = opt.state_dict()
    good["dgg"]["gate"]["filled"] = torch.tensor([3, 0])
    good["dgg"]["gate"]["window"] = torch.tensor([[1.0, 2.0, 3.0], [0.0, 0.0, 0.0]])
    opt.load_state_dict(good)  # a consistent state loads
    bad = {**good, "dgg": {**good["dgg"], "gate": {**good["dgg"]["gate"], **edit}}}
    with pytest.raises(ValueError, match=match):
        opt.load_state_dict(bad)
