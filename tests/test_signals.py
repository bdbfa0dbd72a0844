"""The drift signals of issue 19 inside the gate: the trip direction (``GateConfig.drift_direction``) of the threshold
and Z-score rules, and ``drift="energy_decay"``, the statistic the gate computes from its own lm_head energy (equal
to the demo's post-hoc definition, exact skip, no host sync, checkpoints old and new)."""

from __future__ import annotations

import io
import math

import numpy as np
import pytest
import torch

from dgg_fused import DRIFT_STATS, GATE_DRIFT_STATS, HARM_DIRECTIONS, GateConfig, GatedOptimizer, drift_stats
from dgg_fused.gate import GateState, gate_step_
from dgg_fused.testing import internals, record_syncs
from helpers import assert_bit_identical, batch, loss_fn, make_model, snapshot

F32 = np.float32


# ---------------------------------------------------------------- configuration
def test_harm_directions_and_auto():
    assert set(HARM_DIRECTIONS) == set(DRIFT_STATS) | set(GATE_DRIFT_STATS)
    below = {name for name, d in HARM_DIRECTIONS.items() if d == "below"}
    assert below == {"ess", "energy_decay"}
    for name in DRIFT_STATS:
        cfg = GateConfig(energy=False, drift=name)
        assert cfg.drift_direction == "auto" and cfg.trip_direction == HARM_DIRECTIONS[name]
        assert GateConfig(energy=False, drift=name, drift_direction="above").trip_direction == "above"
        assert GateConfig(energy=False, drift=name, drift_direction="below").trip_direction == "below"
    assert GateConfig().trip_direction is None


def test_direction_and_decay_config_errors():
    with pytest.raises(ValueError, match=r"GateConfig\.drift_direction"):
        GateConfig(energy=False, drift="ess", drift_direction="low")
    with pytest.raises(ValueError, match=r"GateConfig\.drift_direction='below' does nothing"):
        GateConfig(drift_direction="below")  # no drift statistic: the field is never read
    with pytest.raises(ValueError, match=r"GateConfig\.drift"):
        GateConfig(drift="energy")
    cfg = GateConfig(energy=False, drift="energy_decay", drift_threshold=0.5)
    assert cfg.reads_energy and not cfg.takes_drift and cfg.uses_drift
    assert not GateConfig.recommended().reads_energy and GateConfig.recommended().takes_drift
    assert GateConfig.from_dict(cfg.to_dict()) == cfg
    old = {k: v for k, v in GateConfig().to_dict().items() if k != "drift_direction"}  # a checkpoint from before
    assert GateConfig.from_dict(old) == GateConfig()
    model = make_model()
    with pytest.raises(TypeError, match="energy_decay"):
        GatedOptimizer(torch.optim.AdamW(model.parameters(), fused=True), lm_head=None, config=cfg)


# ---------------------------------------------------------------- the direction, on the reference rule
def _drive(cfg, seq):
    """seq: (k, energy or None, drift or None) per step, through GateState.set_reuse_index; returns skips, state."""
    st = GateState.create(cfg.window, "cpu")
    out = []
    for k, e, d in seq:
        st.set_reuse_index(k)
        out.append(gate_step_(st, None if e is None else torch.tensor(e),
                              cfg, drift=None if d is None else torch.tensor(d)).item())
    return out, st


def test_threshold_below_trips_under_the_threshold_on_reuse_only():
    cfg = GateConfig(energy=False, drift="ess", drift_threshold=0.5)
    assert cfg.trip_direction == "below"
    seq = [(1, None, 0.01), (2, None, 0.9), (3, None, 0.5), (4, None, 0.49),  # 0.5 is not < 0.5
           (1, None, 1.0), (2, None, float("nan"))]  # a non-finite value trips either way
    skips, st = _drive(cfg, seq)
    assert skips == [0, 0, 0, 1, 0, 1]
    assert st.counters.tolist() == [6, 2, 2]
    above = GateConfig(energy=False, drift="ess", drift_threshold=0.5, drift_direction="above")
    assert _drive(above, seq)[0] == [0, 1, 1, 1, 0, 1]  # 0.9 > 0.5 trips and stops the batch


@pytest.mark.parametrize("direction,tail,expect", [("below", 0.005, [0, 0, 0, 0, 1]),
                                                    ("below", 0.05, [0, 0, 0, 0, 0]),
                                                    ("above", 0.05, [0, 0, 0, 0, 1]),
                                                    ("above", 0.005, [0, 0, 0, 0, 0])])
def test_zscore_direction(direction, tail, expect):
    cfg = GateConfig(window=3, tau=2.0, energy=False, drift="approx_kl", drift_rule="zscore",
                     drift_direction=direction)
    seq = [(1, None, v) for v in (0.010, 0.012, 0.011)] + [(2, None, 0.0112), (3, None, tail)]
    skips, st = _drive(cfg, seq)
    assert skips == expect
    w = np.array([0.010, 0.012, 0.011]) / np.mean([0.010, 0.012, 0.011])
    z = (tail / np.mean([0.010, 0.012, 0.011]) - w.mean()) / w.std()
    assert math.isclose(st.drift_last[1].item(), z, rel_tol=1e-4)


def test_zscore_below_nonfinite_records_minus_inf_and_trips_once_full():
    cfg = GateConfig(window=2, tau=1.0, energy=False, drift="ess", drift_rule="zscore")
    skips, st = _drive(cfg, [(2, None, float("nan"))])  # window empty: no trip
    assert skips == [0] and st.drift_last[1].item() == float("-inf")
    skips, st = _drive(cfg, [(1, None, 0.9), (1, None, 0.95), (2, None, float("nan"))])
    assert skips == [0, 0, 1]


# ---------------------------------------------------------------- energy_decay, on the reference rule
DECAY = GateConfig(energy=False, drift="energy_decay", drift_threshold=0.5)


def test_energy_decay_values_and_batch_boundaries():
    seq = [(1, 4.0, None), (1, 2.0, None), (2, 1.5, None), (3, 0.3, None),  # batch 1: first-pass mean 3
           (1, 10.0, None), (1, 10.0, None), (2, 6.0, None), (2, 4.0, None)]  # batch 2: mean 10 (restarted)
    st = GateState.create(DECAY.window, "cpu")
    decays, skips = [], []
    for k, e, _ in seq:
        st.set_reuse_index(k)  # once per step: repeated k = 1 calls continue the first pass
        skips.append(gate_step_(st, torch.tensor(e), DECAY).item())
        decays.append(st.drift_last[0].item())
    expect = [1.0, 2.0 / 3.0, 0.5, 0.1, 1.0, 1.0, 0.6, 0.4]  # a first-pass step: over the mean so far, itself in
    assert decays == [float(F32(x)) for x in expect]
    assert skips == [0, 0, 0, 1, 0, 0, 0, 1]  # 0.5 is not < 0.5; 0.1 and 0.4 are
    assert st.first_pass_count.item() == 2 and st.first_pass_energy.item() == 20.0
    assert not math.isnan(st.last[0].item()) and st.last[0].item() == 4.0  # the energy is reported


def test_energy_decay_without_a_first_pass_is_nan_and_trips():
    """No finite first-pass energy in the batch (no first pass run, or all of them non-finite): the decay is 0 / 0
    = NaN, a non-finite statistic, which trips a reuse step like any other (docs/rule.md)."""
    skips, st = _drive(DECAY, [(1, float("inf"), None), (2, 1.0, None)])
    assert skips == [0, 1] and math.isnan(st.drift_last[0].item())
    assert st.first_pass_count.item() == 0


def test_energy_decay_of_a_zero_gradient_batch_is_one_and_does_not_trip():
    """A batch whose first pass has zero energy (all advantages 0: zero gradients): a zero-energy reuse step has
    nothing to decay (exactly 1, no trip; the demo's post-hoc definition leaves such steps out: no evidence either
    way); a non-zero one over that zero mean is inf, which trips as any non-finite statistic does."""
    skips, st = _drive(DECAY, [(1, 0.0, None), (1, 0.0, None), (2, 0.0, None)])
    assert skips == [0, 0, 0] and st.drift_last[0].item() == 1.0
    skips, st = _drive(DECAY, [(1, 0.0, None), (2, 3.0, None)])
    assert skips == [0, 1] and st.drift_last[0].item() == float("inf")


def test_energy_decay_ignores_external_skips_on_the_first_pass():
    st = GateState.create(DECAY.window, "cpu")
    st.set_reuse_index(1)
    gate_step_(st, torch.tensor(100.0), DECAY, external_skip=torch.tensor(1.0))  # a GradScaler overflow
    gate_step_(st, torch.tensor(2.0), DECAY)
    assert st.first_pass_count.item() == 1 and st.first_pass_energy.item() == 2.0


# ---------------------------------------------------------------- energy_decay through GatedOptimizer
def _decay_run(config, batches=4, steps_per_pass=2, k_max=3, inner=None, model=None):
    """Every pass of every batch, ``steps_per_pass`` mini-batch steps each; returns per-step records."""
    model = model or make_model()
    opt = GatedOptimizer(inner or torch.optim.AdamW(model.parameters(), lr=1e-2, fused=True),
                         lm_head=model.lm_head, config=config)
    records = []
    for b in range(batches):
        for k in range(1, k_max + 1):
            for i in range(steps_per_pass):
                opt.set_reuse_index(k)  # every step, as TRL does
                loss_fn(model, batch(100 * b + 10 * i + k), 0.3 ** (k - 1)).backward()
                opt.step()
                m = opt.get_metrics()
                records.append({"batch": b, "reuse_index": k, "energy": m["energy"], "decay": m["drift"],
                                "skipped": m["skipped"]})
                opt.zero_grad()
    return model, opt, records


def test_energy_decay_equals_the_demos_post_hoc_definition():
    """The gate's decay on every reuse step == ``dgg_fused.demo.report.derived_steps`` (energy / mean of the batch's
    first-pass step energies, in float64 on the recorded float32 energies), to float32 rounding. On a first-pass
    step the gate's value uses the first-pass steps so far (the post-hoc one all of them): equal on the last one."""
    from dgg_fused.demo.report import derived_steps

    cfg = GateConfig(energy=False, drift="energy_decay", drift_threshold=0.5, action="watch")
    _, _, records = _decay_run(cfg)
    derived = derived_steps([{k: r[k] for k in ("batch", "reuse_index", "energy")} for r in records])
    compared = 0
    for i, (r, d) in enumerate(zip(records, derived)):
        last_first = r["reuse_index"] == 1 and records[i + 1]["reuse_index"] > 1
        if r["reuse_index"] > 1 or last_first:
            assert r["decay"] == float(F32(d["energy_decay"])), (r, d["energy_decay"])
            compared += 1
    assert compared == 4 * (2 * 2 + 1)
    assert min(r["decay"] for r in records) < 0.5  # the loss is scaled by 0.3^(k-1): the energy decays


def test_energy_decay_gate_is_exact_and_sync_free():
    """A decay gate (skip) drops the reuse steps whose decay is below the threshold exactly, stops the batch, and
    no step reads the device on the host (fused AdamW)."""
    cfg = GateConfig(energy=False, drift="energy_decay", drift_threshold=0.03)  # k = 2: ~0.09, k = 3: ~0.008
    model, opt, records = _decay_run(cfg)
    assert any(r["skipped"] for r in records) and not all(r["skipped"] for r in records if r["reuse_index"] > 1)
    # the same steps by hand: the bare optimizer, stepping what the gate applied
    m_ref = make_model()
    ref = torch.optim.AdamW(m_ref.parameters(), lr=1e-2, fused=True)
    it = iter(records)
    for b in range(4):
        for k in range(1, 4):
            for i in range(2):
                loss_fn(m_ref, batch(100 * b + 10 * i + k), 0.3 ** (k - 1)).backward()
                if not next(it)["skipped"]:
                    ref.step()
                ref.zero_grad()
    assert_bit_identical(snapshot(model, opt), snapshot(m_ref, ref), "decay gate vs the applied steps by hand")
    opt.set_reuse_index(1)
    loss_fn(model, batch(0)).backward()
    opt.step()
    opt.zero_grad()
    opt.set_reuse_index(2)
    loss_fn(model, batch(1), 1e-3).backward()
    with record_syncs() as rec:
        opt.record_drift(**drift_stats(torch.tensor([-1.0]), torch.tensor([-1.0])))  # accepted, not needed
        opt.step()
    assert rec.events == []
    assert opt.reuse_stopped


def test_energy_decay_through_decide_with_a_given_energy():
    """The public seam carries the decay: decide_(energy=...) is what an engine (DeepSpeed ZeRO) hands in."""
    model = make_model()
    opt = GatedOptimizer(torch.optim.AdamW(model.parameters(), fused=True), lm_head=model.lm_head, config=DECAY)
    for k, e in ((1, 8.0), (2, 2.0)):
        opt.set_reuse_index(k)
        loss_fn(model, batch(k)).backward()
        with opt.step_hooks():
            d = opt.decide_(energy=torch.tensor(e))
        opt.apply_(d)
        opt.zero_grad()
    m = opt.get_metrics()
    assert (m["energy"], m["drift"], m["gated"]) == (2.0, 0.25, 1.0)
    with pytest.raises(ValueError, match="reads no lm_head energy"):
        kl = GatedOptimizer(torch.optim.AdamW(model.parameters(), fused=True), lm_head=None,
                            config=GateConfig.recommended())
        kl.decide_(energy=torch.tensor(1.0))


def test_energy_decay_checkpoints_new_and_old():
    cfg = GateConfig(energy=False, drift="energy_decay", drift_threshold=0.5, action="watch")
    model, opt, _ = _decay_run(cfg, batches=1, k_max=1)  # stopped mid-batch, after its first pass
    gate = internals(opt).gate
    assert gate.first_pass_count.item() == 2
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    buf.seek(0)
    sd = torch.load(buf, weights_only=True)
    fresh = GatedOptimizer(torch.optim.AdamW(model.parameters(), fused=True), lm_head=model.lm_head, config=cfg)
    fresh.load_state_dict(sd)
    for key in ("first_pass_energy", "first_pass_count", "scale"):
        assert torch.equal(getattr(internals(fresh).gate, key), getattr(gate, key)), key
    old = {**sd, "dgg": {**sd["dgg"], "gate": {k: v for k, v in sd["dgg"]["gate"].items()
                                               if k not in ("first_pass_energy", "first_pass_count", "scale")}}}
    older = GatedOptimizer(torch.optim.AdamW(model.parameters(), fused=True), lm_head=model.lm_head, config=cfg)
    older.load_state_dict(old)  # the previous format: the new state takes its defaults
    g = internals(older).gate
    assert (g.first_pass_energy.item(), g.first_pass_count.item(), g.scale.item()) == (0.0, 0, 1.0)


@pytest.mark.parametrize("edit,match", [
    ({"first_pass_count": torch.tensor(-1)}, "first_pass"),
    ({"first_pass_energy": torch.tensor(float("nan"), dtype=torch.float64)}, "first_pass"),
    ({"first_pass_energy": torch.tensor(-1.0, dtype=torch.float64), "first_pass_count": torch.tensor(1)}, "first_pass"),
    ({"first_pass_energy": torch.tensor(3.0, dtype=torch.float64), "first_pass_count": torch.tensor(0)}, "first_pass"),
    ({"scale": torch.tensor(1.5)}, "scale"),
    ({"scale": torch.tensor(float("nan"))}, "scale"),
    ({"first_pass_energy": torch.tensor(1.0)}, "first_pass_energy.*dtype"),  # float32, not float64
])
def test_impossible_decay_and_scale_states_are_refused(edit, match):
    model = make_model()
    opt = GatedOptimizer(torch.optim.AdamW(model.parameters(), fused=True), lm_head=model.lm_head, config=DECAY)
    good = opt.state_dict()
    before = {k: v.clone() for k, v in internals(opt).gate.tensors().items()}
    bad = {**good, "dgg": {**good["dgg"], "gate": {**good["dgg"]["gate"], **edit}}}
    with pytest.raises(ValueError, match=match):
        opt.load_state_dict(bad)
    for k, v in before.items():
        torch.testing.assert_close(internals(opt).gate.tensors()[k], v, rtol=0, atol=0, equal_nan=True, msg=k)
