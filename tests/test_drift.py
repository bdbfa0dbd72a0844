"""The drift-signal gate: drift_stats against a float64 reference, the threshold / Z-score rules and their
combination with the energy rule, the exact skip and zero host syncs of GatedOptimizer with a drift gate."""

from __future__ import annotations

import io
import math
import zlib

import numpy as np
import pytest
import torch

from dgg_fused import DRIFT_STATS, GateConfig, GatedOptimizer, drift_stats
from dgg_fused.gate import GateState, gate_step_
from dgg_fused.testing import internals
from helpers import assert_bit_identical, batch, loss_fn, make_model, record_syncs, snapshot


# ---------------------------------------------------------------- drift_stats
def _stats_ref(new, old, mask, eps):
    """float64 numpy reference of every statistic of drift_stats, straight from the definitions (the ESS with the
    largest log ratio subtracted, as the only float64 form that survives log ratios of +-1000)."""
    new, old = np.asarray(new, np.float64), np.asarray(old, np.float64)
    m = np.ones_like(new, bool) if mask is None else np.asarray(mask) != 0
    lr = (new - old)[m]
    if lr.size == 0:
        return {"approx_kl": 0.0, "clip_frac": 0.0, "ratio_max": 0.0, "ess": 1.0, "log_ratio_m2": 0.0, "tv": 0.0}
    with np.errstate(over="ignore"):  # exp(1000) is inf in float64 too: only the ESS needs to survive it
        r = np.exp(lr)
        tv = float(0.5 * np.mean(np.abs(np.expm1(lr))))
    w = np.exp(lr - lr.max())
    return {"approx_kl": float(np.mean((r - 1) - lr)), "clip_frac": float(np.mean(np.abs(r - 1) > eps)),
            "ratio_max": float(np.max(np.abs(lr))), "ess": float(w.sum() ** 2 / (lr.size * np.sum(w * w))),
            "log_ratio_m2": float(np.mean(lr * lr)), "tv": tv}


@pytest.mark.parametrize("shape", [(1,), (3, 7), (2, 5, 4), (0,), (1, 0)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("masked", [False, True])
def test_drift_stats_matches_float64_reference(shape, dtype, masked):
    g = torch.Generator().manual_seed(sum(shape) + masked)
    old = -torch.rand(shape, generator=g, dtype=torch.float64) * 3
    new = old + torch.randn(shape, generator=g, dtype=torch.float64) * 0.3
    mask = (torch.rand(shape, generator=g) > 0.3) if masked else None
    new_t, old_t = new.to(dtype), old.to(dtype)
    got = drift_stats(new_t, old_t, mask, clip_eps=0.2)
    ref = _stats_ref(new_t.double(), old_t.double(), mask, 0.2)
    assert set(got) == set(DRIFT_STATS)
    for k, v in got.items():
        assert v.shape == () and v.dtype == torch.float32
        assert math.isclose(v.item(), ref[k], rel_tol=1e-5, abs_tol=1e-6), (k, v.item(), ref[k])


#: Tolerance of ess / log_ratio_m2 / tv against the float64 reference of the inputs *as given*, per input dtype:
#: ``|got - ref| <= atol + rtol |ref|``. Everything is computed in float32 from the log-probabilities rounded to
#: float32, which is exact for bfloat16 / float16 / float32 inputs: what is left is float32 arithmetic (measured
#: worst 5e-7 relative over the shapes and drifts below, 1M tokens included). float64 inputs lose their low bits in
#: that rounding: |logp| <= 8 moves each log ratio by up to ~1e-6, i.e. up to ~1e-3 of the second moment of a 1e-3
#: drift (measured 8e-4).
SIGNAL_TOL = {torch.float32: (4e-6, 1e-12), torch.bfloat16: (4e-6, 1e-12), torch.float16: (4e-6, 1e-12),
              torch.float64: (3e-3, 1e-9)}
SIGNAL_SHAPES = {"one": (1,), "odd": (3, 7), "prime": (257,), "2d-odd": (64, 999), "large": (1 << 20,),
                 "empty": (0,), "empty-2d": (2, 0)}


SIGNAL_CASES = [  # every dtype x shape x drift x mask; the 1M-token shape with a random mask only
    pytest.param(dt, shape, drift, mk, id=f"{str(dt)[6:]}-{name}-{drift}-{mk}")
    for dt in SIGNAL_TOL for name, shape in SIGNAL_SHAPES.items() for drift in (1e-3, 1.0)
    for mk in ("none", "random", "empty") if name != "large" or mk == "random"
]


@pytest.mark.parametrize("dtype,shape,drift,mask_kind", SIGNAL_CASES)
def test_new_signals_match_float64_reference(dtype, shape, drift, mask_kind):
    """ess, log_ratio_m2, tv against float64 from the definitions: per-dtype tolerances (SIGNAL_TOL), odd / one-token /
    empty / 1M-token shapes, an empty mask (ess = 1, the others 0), drifts from near on-policy to large."""
    g = torch.Generator().manual_seed(zlib.crc32(repr((shape, drift, mask_kind)).encode()))
    old = -torch.rand(shape, generator=g, dtype=torch.float64) * 8
    new = old + torch.randn(shape, generator=g, dtype=torch.float64) * drift
    mask = {"none": None, "random": torch.rand(shape, generator=g) > 0.3, "empty": torch.zeros(shape, dtype=torch.bool)}[mask_kind]
    new_t, old_t = new.to(dtype), old.to(dtype)
    got = drift_stats(new_t, old_t, mask)
    ref = _stats_ref(new_t.double(), old_t.double(), mask, 0.2)
    rtol, atol = SIGNAL_TOL[dtype]
    for k in ("ess", "log_ratio_m2", "tv"):
        v = got[k]
        assert v.shape == () and v.dtype == torch.float32
        assert abs(v.item() - ref[k]) <= atol + rtol * abs(ref[k]), (k, v.item(), ref[k], abs(v.item() - ref[k]))
    assert 0.0 < got["ess"].item() <= 1.0
    if mask_kind == "empty" or 0 in shape:
        assert (got["ess"].item(), got["log_ratio_m2"].item(), got["tv"].item()) == (1.0, 0.0, 0.0)


@pytest.mark.parametrize("big", [80.0, 1000.0])
def test_ess_is_stable_for_huge_log_ratios(big):
    """exp(+-80) is 5.5e34 / 1.8e-35: the plain (sum r)^2 / (n sum r^2) overflows to inf / inf = NaN in float32 (the
    squares exceed 3.4e38); with the largest log ratio subtracted the ESS is exact. +-1000 overflows exp itself."""
    new = torch.tensor([big, -big, 0.0, big - 1.0, 3.0])
    old = torch.zeros(5)
    got = drift_stats(new, old)["ess"].item()
    ref = _stats_ref(new.double(), old.double(), None, 0.2)["ess"]
    assert math.isclose(got, ref, rel_tol=4e-6), (got, ref)
    r = new.exp()
    assert not math.isfinite((r.sum() ** 2 / (5 * (r * r).sum())).item())  # what the unshifted form gives
    only_neg = drift_stats(torch.tensor([-big, -big - 1.0]), torch.zeros(2))["ess"].item()  # underflow of exp(l)
    assert math.isclose(only_neg, _stats_ref([-big, -big - 1.0], [0.0, 0.0], None, 0.2)["ess"], rel_tol=4e-6)
    assert drift_stats(torch.full((7,), big), torch.zeros(7))["ess"].item() == 1.0  # a common shift is no drift


def _gated_for_drift():
    model = torch.nn.Linear(2, 2)
    return GatedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1),
                          lm_head=None, config=GateConfig(energy=False, drift="approx_kl", drift_threshold=1.0))


@pytest.mark.parametrize("chunks", [
    [(6,)],  # one micro-batch: exactly drift_stats
    [(3, 4), (5,), (2, 3)],  # uneven micro-batches
    [(4,), (0,), (3,)],  # an empty micro-batch counts nothing
])
@pytest.mark.parametrize("scale", [0.05, 1.0, 80.0])  # 80: the ESS sums of different micro-batches must be rescaled
def test_drift_accumulator_equals_drift_stats_of_the_whole_step(chunks, scale):
    """DriftAccumulator over a step's micro-batches gives drift_stats of their concatenation (every statistic,
    float64 reference), masks and all; a micro-batch with the step's largest log ratio arriving late exercises the
    ESS rescaling."""
    from dgg_fused.integrations import DriftAccumulator

    g = torch.Generator().manual_seed(len(chunks) * 7 + int(scale))
    acc, news, olds, masks = DriftAccumulator(), [], [], []
    for i, shape in enumerate(chunks):
        new = torch.randn(shape, generator=g, dtype=torch.float64) * scale + (scale if i == len(chunks) - 1 else 0.0)
        old = torch.randn(shape, generator=g, dtype=torch.float64) * 0.1
        mask = torch.rand(shape, generator=g) > 0.25
        acc.add(new.float(), old.float(), mask)
        news.append(new.float().double().flatten()), olds.append(old.float().double().flatten())
        masks.append(mask.flatten())
    opt = _gated_for_drift()
    acc.record(opt)
    assert acc.empty
    ref = _stats_ref(torch.cat(news), torch.cat(olds), torch.cat(masks), 0.2)
    got = {k: v.item() for k, v in internals(opt).pending_drift.items()}
    assert set(got) == set(DRIFT_STATS)
    for k in DRIFT_STATS:
        if math.isfinite(ref[k]) and abs(ref[k]) < 1e30:
            assert math.isclose(got[k], ref[k], rel_tol=2e-5, abs_tol=1e-6), (k, got[k], ref[k])
        else:  # exp(80)-sized approx_kl / tv: float32 overflows where float64 does not; only their size is checked
            assert got[k] > 1e30, (k, got[k])


def test_drift_accumulator_needs_a_micro_batch_and_checks_input():
    from dgg_fused.integrations import DriftAccumulator

    acc = DriftAccumulator()
    with pytest.raises(RuntimeError, match="no micro-batch"):
        acc.record(_gated_for_drift())
    with pytest.raises(ValueError, match="shapes differ"):
        acc.add(torch.zeros(3), torch.zeros(4), None)
    assert acc.empty  # a rejected micro-batch leaves the step's sums untouched


def test_nonfinite_log_ratios_make_the_signals_nonfinite():
    s = drift_stats(torch.tensor([float("nan"), -1.0]), torch.tensor([-1.0, -1.0]))
    assert all(math.isnan(s[k].item()) for k in ("ess", "log_ratio_m2", "tv"))
    s = drift_stats(torch.tensor([float("-inf"), float("-inf")]), torch.tensor([-1.0, -1.0]))  # no weight left
    assert math.isnan(s["ess"].item()) and math.isinf(s["log_ratio_m2"].item())


def test_signals_agree_with_the_demo_grpo_loss():
    """The demo's GRPO loss (dgg_fused/demo/grpo.py ``ppo_clip_loss``) computes ess / log_ratio_m2 / tv itself, with
    the plain formulas; the library's agree to float32 rounding: relative 4e-6, and for tv (the demo's r - 1 rounds
    near r = 1, the library's expm1 does not) an absolute 2^-23, one float32 ulp of r = 1."""
    from dgg_fused.demo.grpo import ppo_clip_loss

    for seed, drift in [(0, 1e-3), (1, 0.05), (2, 0.5), (3, 1.5)]:
        g = torch.Generator().manual_seed(seed)
        old = -torch.rand(16, 33, generator=g) * 6
        new = old + torch.randn(16, 33, generator=g) * drift
        mask = (torch.rand(16, 33, generator=g) > 0.25).float()
        _, demo = ppo_clip_loss(new, old, torch.randn(16, generator=g), mask)
        lib = drift_stats(new, old, mask)
        for k, atol in (("ess", 0.0), ("log_ratio_m2", 0.0), ("tv", 2.0**-23)):
            a, b = lib[k].item(), demo[k].item()
            assert abs(a - b) <= atol + 4e-6 * abs(b), (seed, k, a, b)


def test_drift_stats_hand_case_and_padding():
    # two real tokens with log-ratios +0.5 and -0.1, one padding token with -inf log-probs (masked out)
    new = torch.tensor([-1.0, -2.1, float("-inf")])
    old = torch.tensor([-1.5, -2.0, float("-inf")])
    s = drift_stats(new, old, torch.tensor([1, 1, 0]), clip_eps=0.2)
    kl = ((math.exp(0.5) - 1 - 0.5) + (math.exp(-0.1) - 1 + 0.1)) / 2
    assert math.isclose(s["approx_kl"].item(), kl, rel_tol=1e-6)
    assert s["clip_frac"].item() == 0.5  # only the +0.5 token is outside [0.8, 1.2]
    assert math.isclose(s["ratio_max"].item(), 0.5, rel_tol=1e-6)
    w = (math.exp(0.5), math.exp(-0.1))
    assert math.isclose(s["ess"].item(), sum(w) ** 2 / (2 * (w[0] ** 2 + w[1] ** 2)), rel_tol=1e-6)
    assert math.isclose(s["log_ratio_m2"].item(), (0.25 + 0.01) / 2, rel_tol=1e-6)
    assert math.isclose(s["tv"].item(), 0.5 * ((w[0] - 1) + (1 - w[1])) / 2, rel_tol=1e-6)
    on = drift_stats(new[:2], new[:2])
    assert on["approx_kl"].item() == 0.0 and on["ess"].item() == 1.0 and on["tv"].item() == 0.0  # on-policy: exact


def test_drift_stats_bad_input():
    with pytest.raises(ValueError, match="shapes differ"):
        drift_stats(torch.zeros(3), torch.zeros(4))
    with pytest.raises(ValueError, match="mask shape"):
        drift_stats(torch.zeros(3), torch.zeros(3), torch.ones(2))
    with pytest.raises(TypeError, match="floating"):
        drift_stats(torch.zeros(3, dtype=torch.long), torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="clip_eps"):
        drift_stats(torch.zeros(3), torch.zeros(3), clip_eps=float("nan"))


# ---------------------------------------------------------------- config
def test_config_validation():
    with pytest.raises(ValueError, match="drift"):
        GateConfig(drift="kl")
    with pytest.raises(ValueError, match="energy=False"):
        GateConfig(energy=False)
    with pytest.raises(ValueError, match="drift_threshold"):
        GateConfig(drift="approx_kl", drift_threshold=0.0)
    with pytest.raises(ValueError, match="drift_rule"):
        GateConfig(drift="approx_kl", drift_rule="mean")
    with pytest.raises(ValueError, match="combine"):
        GateConfig(drift="approx_kl", combine="or")
    cfg = GateConfig(energy=False, drift="clip_frac", drift_threshold=1)
    assert GateConfig.from_dict(cfg.to_dict()) == cfg and isinstance(cfg.drift_threshold, float)
    # a checkpoint written before these fields existed still loads (defaults: the paper's rule)
    old = {k: v for k, v in GateConfig().to_dict().items() if not k.startswith(("drift", "energy", "combine"))}
    assert GateConfig.from_dict(old) == GateConfig()


# ---------------------------------------------------------------- the rule (reference implementation)
def _drive(cfg, seq):
    """seq: (k, energy, drift) per step; returns the skip flags and the state."""
    st = GateState.create(cfg.window, "cpu")
    out = []
    for k, e, d in seq:
        st.reuse_index.fill_(k)
        if k == 1:
            st.stopped.fill_(False)
        e_t = None if e is None else torch.tensor(e)
        out.append(gate_step_(st, e_t, cfg, drift=torch.tensor(d)).item())
    return out, st


def test_threshold_rule_is_ppo_early_stop_on_reuse_passes():
    cfg = GateConfig(energy=False, drift="approx_kl", drift_threshold=0.05)
    # k = 1 never trips, even far above the threshold; k > 1 trips as soon as KL > 0.05, and stays stopped
    seq = [(1, None, 0.9), (2, None, 0.01), (3, None, 0.06), (4, None, 0.0), (1, None, 0.0), (2, None, 0.05)]
    skips, st = _drive(cfg, seq)
    assert skips == [0, 0, 1, 1, 0, 0]  # 0.05 is not > 0.05
    assert st.counters.tolist() == [6, 2, 1]
    assert torch.isnan(st.last[0]) and torch.isnan(st.last[1])  # no energy rule: no energy metrics


def test_threshold_rule_nonfinite_drift_trips_on_reuse_only():
    cfg = GateConfig(energy=False, drift="ratio_max", drift_threshold=1.0)
    skips, _ = _drive(cfg, [(1, None, float("nan")), (2, None, float("inf"))])
    assert skips == [0, 1]


def _energy_trip_seq(drift_on_spike):
    # window of 3 first-pass energies ~1, then a reuse step with a huge energy spike and a given drift
    return [(1, 1.0, 0.0), (1, 1.1, 0.0), (1, 0.9, 0.0), (2, 50.0, drift_on_spike), (1, 1.0, 0.0), (2, 1.0, 0.5)]


@pytest.mark.parametrize("combine,low_drift,expect", [
    ("any", 0.0, [0, 0, 0, 1, 0, 1]),   # energy spike trips alone; KL 0.5 trips alone
    ("all", 0.0, [0, 0, 0, 0, 0, 0]),   # neither step has both
    ("all", 0.5, [0, 0, 0, 1, 0, 0]),   # spike + high KL: both
])
def test_combine_energy_and_drift(combine, low_drift, expect):
    cfg = GateConfig(window=3, tau=3.0, drift="approx_kl", drift_threshold=0.1, combine=combine)
    skips, _ = _drive(cfg, _energy_trip_seq(low_drift))
    assert skips == expect


def test_energy_only_rule_unchanged_by_drift_code():
    cfg_e = GateConfig(window=3, tau=3.0)
    seq = _energy_trip_seq(0.0)
    st = GateState.create(3, "cpu")
    skips = []
    for k, e, _ in seq:
        st.reuse_index.fill_(k)
        if k == 1:
            st.stopped.fill_(False)
        skips.append(gate_step_(st, torch.tensor(e), cfg_e).item())
    assert skips == [0, 0, 0, 1, 0, 0]


def test_zscore_drift_rule_needs_a_full_window():
    cfg = GateConfig(window=3, tau=2.0, energy=False, drift="approx_kl", drift_rule="zscore")
    seq = [(2, None, 9.0)]  # window empty: never trips
    seq += [(1, None, v) for v in (0.010, 0.012, 0.011)]  # first-pass references
    seq += [(2, None, 0.0115), (3, None, 0.05)]
    skips, st = _drive(cfg, seq)
    assert skips == [0, 0, 0, 0, 0, 1]
    assert st.drift_filled.item() == 3
    w = np.array([0.010, 0.012, 0.011])
    z_ref = (0.05 / np.abs(w).mean() - (w / np.abs(w).mean()).mean()) / (w / np.abs(w).mean()).std()
    assert math.isclose(st.drift_last[1].item(), z_ref, rel_tol=1e-4)


def test_fused_impl_with_drift_raises():
    cfg = GateConfig(drift="approx_kl")
    st = GateState.create(cfg.window, "cpu")
    with pytest.raises(ValueError, match="runs 'reference'"):
        gate_step_(st, torch.tensor(1.0), cfg, drift=torch.tensor(0.0), impl="cpp")
    with pytest.raises(ValueError, match="drift value"):
        gate_step_(st, torch.tensor(1.0), cfg)


# ---------------------------------------------------------------- GatedOptimizer with a drift gate
KL_GATE = GateConfig(energy=False, drift="approx_kl", drift_threshold=0.05)


def _kl_of(k):  # a deterministic per-step "KL": grows with the reuse pass
    return torch.tensor([0.0, 0.01, 0.04, 0.2][k - 1])


def _run_gated(model, opt, n_batches=3):
    for b in range(n_batches):
        for k in opt.passes():
            opt.record_drift(approx_kl=_kl_of(k), clip_frac=torch.tensor(0.0))
            loss_fn(model, batch(10 * b + k)).backward()
            opt.step()
            opt.zero_grad()


def _run_host_early_stop(model, inner, n_batches=3, thr=0.05):
    """The PPO target-KL early stop written by hand, deciding on the host: the reference behaviour."""
    for b in range(n_batches):
        for k in range(1, 5):
            if k > 1 and _kl_of(k).item() > thr:
                break
            loss_fn(model, batch(10 * b + k)).backward()
            inner.step()
            inner.zero_grad()


@pytest.mark.parametrize("lm_head", ["module", None])
def test_kl_gate_equals_hand_written_early_stop_exactly(lm_head):
    m_gate, m_ref = make_model(), make_model()
    opt = GatedOptimizer(torch.optim.AdamW(m_gate.parameters(), lr=1e-2, fused=True),
                         lm_head=m_gate.lm_head if lm_head else None, config=KL_GATE)
    _run_gated(m_gate, opt)
    ref = torch.optim.AdamW(m_ref.parameters(), lr=1e-2, fused=True)
    _run_host_early_stop(m_ref, ref)
    assert_bit_identical(snapshot(m_gate, opt), snapshot(m_ref, ref), "kl gate vs hand-written early stop")
    m = opt.get_metrics()
    assert m["stopped_batches"] == 3 and m["gated_steps"] == 3 and m["steps"] == 12
    assert math.isclose(m["drift"], 0.2, rel_tol=1e-6)


def test_drift_gate_step_has_no_host_sync_and_skips_exactly():
    model = make_model()
    opt = GatedOptimizer(torch.optim.AdamW(model.parameters(), lr=1e-2, fused=True), lm_head=model.lm_head,
                         config=GateConfig(window=2, drift="approx_kl", drift_threshold=0.05))
    opt.set_reuse_index(1)
    loss_fn(model, batch(0)).backward()
    opt.record_drift(approx_kl=torch.tensor(0.0))
    opt.step()
    opt.zero_grad()
    opt.set_reuse_index(2)
    loss_fn(model, batch(1)).backward()
    before = snapshot(model, opt)
    with record_syncs() as rec:
        opt.record_drift(**drift_stats(torch.tensor([-1.0, -2.0]), torch.tensor([-1.6, -2.0])))
        opt.step()
    assert rec.events == []
    assert_bit_identical(before, snapshot(model, opt), "drift-gated step")
    assert opt.reuse_stopped


def test_missing_drift_raises_and_loses_no_state():
    model = make_model()
    opt = GatedOptimizer(torch.optim.AdamW(model.parameters(), lr=1e-2, fused=True), lm_head=model.lm_head,
                         config=GateConfig(drift="clip_frac"))
    loss_fn(model, batch(0)).backward()
    opt.record_drift(approx_kl=torch.tensor(0.0))  # not the watched statistic
    before = snapshot(model, opt), internals(opt).gate.state_dict()
    with pytest.raises(RuntimeError, match="record_drift"):
        opt.step()
    assert_bit_identical(before[0], snapshot(model, opt))
    for k, v in before[1].items():
        torch.testing.assert_close(internals(opt).gate.state_dict()[k], v, rtol=0, atol=0, equal_nan=True, msg=k)
    with pytest.raises(ValueError, match="unknown statistic"):
        opt.record_drift(kl=torch.tensor(0.0))
    with pytest.raises(ValueError, match="one-element"):
        opt.record_drift(clip_frac=torch.zeros(2))
    with pytest.raises(TypeError, match="lm_head= is required"):
        GatedOptimizer(torch.optim.AdamW(model.parameters(), fused=True), lm_head=None)


def test_zero_grad_discards_recorded_drift():
    model = make_model()
    opt = GatedOptimizer(torch.optim.AdamW(model.parameters(), fused=True), lm_head=None, config=KL_GATE)
    opt.record_drift(approx_kl=torch.tensor(0.0))
    opt.zero_grad()
    loss_fn(model, batch(0)).backward()
    with pytest.raises(RuntimeError, match="record_drift"):
        opt.step()


def test_record_energy_takes_an_external_energy():
    model = make_model()
    opt = GatedOptimizer(torch.optim.AdamW(model.parameters(), fused=True), lm_head=model.lm_head)
    loss_fn(model, batch(0)).backward()
    e = opt.record_energy(energy=torch.tensor(12.0, dtype=torch.float64), grad_scale=torch.tensor(2.0))
    assert e.dtype == torch.float32 and e.item() == 3.0
    opt.step()
    assert opt.get_metrics()["energy"] == 3.0
    with pytest.raises(ValueError, match="0-d floating"):
        opt.record_energy(energy=torch.zeros(2))


def test_drift_gate_checkpoint_round_trip_and_old_checkpoints():
    cfg = GateConfig(window=3, energy=False, drift="approx_kl", drift_rule="zscore", tau=2.0)
    model = make_model()
    opt = GatedOptimizer(torch.optim.AdamW(model.parameters(), fused=True), lm_head=None, config=cfg)
    for i, v in enumerate((0.010, 0.012, 0.011)):
        opt.set_reuse_index(1)
        loss_fn(model, batch(i)).backward()
        opt.record_drift(approx_kl=torch.tensor(v))
        opt.step()
        opt.zero_grad()
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    buf.seek(0)
    sd = torch.load(buf, weights_only=True)
    opt2 = GatedOptimizer(torch.optim.AdamW(model.parameters(), fused=True), lm_head=None, config=cfg)
    opt2.load_state_dict(sd)
    assert torch.equal(internals(opt2).gate.drift_window, internals(opt).gate.drift_window) and internals(opt2).gate.drift_filled.item() == 3
    # a checkpoint from before the drift state existed: loads, drift state fresh
    for k in GateState.OPTIONAL:
        del sd["dgg"]["gate"][k]
    opt3 = GatedOptimizer(torch.optim.AdamW(model.parameters(), fused=True), lm_head=None, config=cfg)
    opt3.load_state_dict(sd)
    assert internals(opt3).gate.drift_filled.item() == 0


def test_named_presets():
    assert GateConfig.paper(tau=0.5).tau == 0.5
    rec = GateConfig.recommended()
    assert (rec.energy, rec.drift, rec.drift_rule, rec.drift_threshold) == (False, "approx_kl", "threshold", 0.02)
    assert GateConfig.recommended(drift_threshold=0.05, max_reuse=8).drift_threshold == 0.05
    with pytest.raises(ValueError, match="drift_threshold"):
        GateConfig.recommended(drift_threshold=-1.0)


# ---------------------------------------------------------------- which rule fired, and only the rule's metrics
def test_per_rule_trip_counts_when_energy_and_drift_combine():
    """Issue 18, edge 4: with both rules on, the metrics say which one fired (energy_trips, drift_trips)."""
    cfg = GateConfig(window=2, tau=3.0, std_floor=0.5, drift="approx_kl", drift_threshold=0.05)
    model = make_model()
    opt = GatedOptimizer(torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True), lm_head=model.lm_head,
                         config=cfg)
    seen = []
    # two batches fill the energy window; then a reuse pass with a large KL (drift fires), then one with an
    # energy spike x1e3 and a small KL (energy fires), then both at once
    for b, (scale, kl) in enumerate([(1.0, 0.0), (1.0, 0.0), (1.0, 0.5), (1e3, 0.0), (1e3, 0.5)]):
        for k in (1, 2):
            opt.set_reuse_index(k)
            loss_fn(model, batch(b), scale=scale if k == 2 else 1.0).backward()
            opt.record_drift(approx_kl=torch.tensor(kl if k == 2 else 0.0))
            opt.step()
            opt.zero_grad()
            m = opt.get_metrics()
            seen.append((m["gated"], m["energy_trips"], m["drift_trips"]))
    assert [s for s in seen if s[0]] == [(1.0, 0, 1), (1.0, 1, 1), (1.0, 2, 2)]
    assert opt.get_metrics()["stopped_batches"] == 3
    # the counts ride in the checkpoint, and an impossible count is refused
    sd = opt.state_dict()
    assert sd["dgg"]["gate"]["rule_trips"].tolist() == [2, 2]
    bad = {**sd, "dgg": {**sd["dgg"], "gate": {**sd["dgg"]["gate"], "rule_trips": torch.tensor([4, 0])}}}
    with pytest.raises(ValueError, match="rule_trips"):
        opt.load_state_dict(bad)


@pytest.mark.parametrize("cfg,keys", [
    (GateConfig(), {"energy", "statistic", "window_filled"}),
    (GateConfig.recommended(), {"drift", "drift_statistic"}),
    (GateConfig(energy=False, drift="clip_frac", drift_rule="zscore"), {"drift", "drift_statistic",
                                                                        "drift_window_filled"}),
    (GateConfig(drift="approx_kl"), {"energy", "statistic", "window_filled", "drift", "drift_statistic",
                                     "energy_trips", "drift_trips"}),
])
def test_metrics_are_the_rules_own(cfg, keys):
    """Issue 18, edge 3: a drift-only gate reports no NaN energy / statistic and no window it does not have."""
    common = {"gated", "skipped", "steps", "gated_steps", "stopped_batches", "reuse_index"}
    model = make_model()
    opt = GatedOptimizer(torch.optim.AdamW(model.parameters(), fused=True),
                         lm_head=model.lm_head if cfg.energy else None, config=cfg)
    opt.set_reuse_index(1)
    loss_fn(model, batch(0)).backward()
    opt.record_drift(**drift_stats(torch.zeros(3), torch.zeros(3)))
    opt.step()
    m = opt.get_metrics()
    assert m.keys() == opt.metrics.keys() == common | keys
    assert not any(isinstance(v, float) and math.isnan(v) for v in m.values()), m
