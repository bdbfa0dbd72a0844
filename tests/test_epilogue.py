"""The fused gate epilogue (C++ CPU op, the same code the CUDA kernel runs) against the reference gate_step_.

The Triton epilogue runs the same harness under the Triton interpreter (tests/test_kernels_triton*.py)."""

from __future__ import annotations

import math
import random

import pytest
import torch

from dgg_fused.config import REFERENCES, STATISTICS, GateConfig
from dgg_fused.gate import GateState, gate_step_
from dgg_fused.ops import available_backends, resolve_epilogue

# ---------------------------------------------------------------------------------------------------- harness
# Drives a fused implementation and the reference gate_step_ through the same step sequences and compares the whole
# GateState after every step. Also imported by test_kernels_triton_interpreted.py (the Triton epilogue).
_SHAPES = ((4, 0.37, 1e-3), (3, 1.7, 0.0))  # (window, tau, std_floor), alternated over the 9 rule variants
CONFIGS = [
    GateConfig(window=w, tau=tau, statistic=s, reference=r, max_reuse=4, std_floor=fl)
    for i, (s, r) in enumerate((s, r) for s in STATISTICS for r in REFERENCES)
    for (w, tau, fl) in [_SHAPES[i % 2]]
]


def sequence(seed: int, n: int = 40, adversarial: bool = False) -> list[tuple[int, float, float | None]]:
    """(reuse index k, energy, external skip or None) per step; k follows the optimizer's 1..K passes."""
    rng = random.Random(seed)
    out: list[tuple[int, float, float | None]] = []
    k = 0
    specials = [float("nan"), float("inf"), -float("inf"), 0.0, 1e-40, 3e38, 1e30, 1.0, 1.0, 1.0, -2.0]
    while len(out) < n:
        k = 1 if k >= 4 or rng.random() < 0.15 else k + 1
        e = math.exp(rng.gauss(0.0, 0.3)) * 100.0
        if rng.random() < 0.15:
            e *= rng.choice([3.0, 10.0, 0.1])
        if adversarial and rng.random() < 0.35:
            e = rng.choice(specials)
        ext = None
        if rng.random() < 0.3:
            ext = rng.choice([0.0, 0.0, 1.0])
        out.append((k, e, ext))
    return out


def _set_reuse(state: GateState, k: int) -> None:
    state.reuse_index.fill_(k)
    if k == 1:
        state.stopped.fill_(False)


def assert_states_match(ref: GateState, got: GateState, tau: float, where: str) -> bool:
    """Compare two states; returns True if they were equal up to rounding, False if a decision flipped only
    because z was within rounding of tau (the caller then re-syncs). Anything else fails."""
    z_ref, z_got = ref.last[1].item(), got.last[1].item()
    flipped = ref.last[2].item() != got.last[2].item()
    if flipped:
        assert math.isfinite(z_ref) and abs(z_ref - tau) <= 1e-5 * max(1.0, abs(tau)), (
            f"{where}: gate decision differs (ref z={z_ref}, fused z={z_got}, tau={tau})"
        )
        return False
    torch.testing.assert_close(got.last[1], ref.last[1], rtol=2e-5, atol=1e-6, equal_nan=True, msg=lambda m: f"{where}: statistic: {m}")
    for name in ("window", "prev_energy"):
        torch.testing.assert_close(
            getattr(got, name), getattr(ref, name), rtol=0, atol=0, equal_nan=True, msg=lambda m: f"{where}: {name}: {m}"
        )
    torch.testing.assert_close(got.last[[0, 2, 3]], ref.last[[0, 2, 3]], rtol=0, atol=0, equal_nan=True,
                               msg=lambda m: f"{where}: last: {m}")
    for name in ("filled", "reuse_index", "stopped", "counters", "skip"):
        assert torch.equal(getattr(got, name), getattr(ref, name)), (
            f"{where}: {name}: fused {getattr(got, name).tolist()} vs reference {getattr(ref, name).tolist()}"
        )
    return True


def run_and_compare(impl: str, config: GateConfig, seq, *, partials_split: int = 1, device: str = "cpu") -> int:
    """Run ``seq`` through both implementations; returns the number of trips seen (so tests can check coverage)."""
    ref = GateState.create(config.window, device)
    got = GateState.create(config.window, device)
    trips = 0
    for i, (k, e, ext) in enumerate(seq):
        _set_reuse(ref, k)
        _set_reuse(got, k)
        energy = torch.tensor(e, dtype=torch.float32, device=device)
        ext_t = None if ext is None else torch.tensor(ext, dtype=torch.float32, device=device)
        skip_ref = gate_step_(ref, energy, config, external_skip=ext_t, impl="reference")
        fused_in = energy
        if partials_split > 1 and math.isfinite(e) and (e == 0.0 or 1e-30 < abs(e) < 1e37):
            # the same energy as partial sums that add up exactly (powers of two split)
            parts = [e / 2.0, e / 4.0, e / 4.0] if partials_split == 3 else [e]
            fused_in = torch.tensor(parts, dtype=torch.float32, device=device)
        skip_got = gate_step_(got, fused_in, config, external_skip=ext_t, impl=impl)
        assert skip_got is got.skip
        assert skip_ref.item() == ref.skip.item()
        ok = assert_states_match(ref, got, config.tau, f"{impl} {config} step {i} (k={k}, e={e}, ext={ext})")
        if not ok:
            for name, t in got.tensors().items():
                t.copy_(ref.tensors()[name])
        trips += int(ref.last[2].item())
    return trips


# ---------------------------------------------------------------------------------------------------- tests

needs_cpp = pytest.mark.skipif("cpp" not in available_backends("cpu"), reason="dgg_fused._C not built")


def test_auto_on_cpu_is_the_reference():
    assert resolve_epilogue("auto", torch.device("cpu")) == "reference"


def test_unknown_or_unavailable_impl_raises():
    with pytest.raises(ValueError, match="gate impl"):
        resolve_epilogue("fast", torch.device("cpu"))
    with pytest.raises(RuntimeError, match="not available"):
        resolve_epilogue("cuda", torch.device("cpu"))


@needs_cpp
@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: f"{c.statistic}-{c.reference}-w{c.window}")
@pytest.mark.parametrize("adversarial", [False, True], ids=["random", "adversarial"])
def test_cpp_epilogue_matches_reference(config, adversarial):
    trips = 0
    for seed in range(2):
        trips += run_and_compare("cpp", config, sequence(seed * 7 + adversarial, n=45, adversarial=adversarial))
    if not adversarial and config.reference != "all":
        assert trips > 0, "the sequences never tripped the gate: the comparison would not cover trips"


@needs_cpp
def test_cpp_epilogue_sums_partials_and_scales():
    cfg = GateConfig(window=2, tau=0.5)
    a = GateState.create(2, "cpu")
    b = GateState.create(2, "cpu")
    gate_step_(a, torch.tensor(12.0) / torch.tensor(2.0).square(), cfg, impl="reference")
    from dgg_fused.ops import gate_epilogue_

    gate_epilogue_("cpp", torch.tensor([6.0, 4.0, 2.0]), b.tensors(), tau=0.5, std_floor=cfg.std_floor,
                   statistic=0, reference=0, grad_scale=torch.tensor(2.0))
    for name, t in a.tensors().items():
        assert torch.equal(t, b.tensors()[name]), name


@needs_cpp
def test_cpp_epilogue_window_not_full_never_trips():
    cfg = GateConfig(window=8, tau=0.1)
    st = GateState.create(8, "cpu")
    for i in range(7):
        st.reuse_index.fill_(1)
        gate_step_(st, torch.tensor(1.0 + i), cfg, impl="cpp")
    st.reuse_index.fill_(2)
    gate_step_(st, torch.tensor(1e30), cfg, impl="cpp")
    assert st.skip.item() == 0.0 and st.filled.tolist() == [7, 6]
    st.reuse_index.fill_(1)
    gate_step_(st, torch.tensor(2.0), cfg, impl="cpp")
    st.reuse_index.fill_(2)
    gate_step_(st, torch.tensor(1e30), cfg, impl="cpp")
    assert st.skip.item() == 1.0 and bool(st.stopped)


@needs_cpp
def test_cpp_epilogue_rejects_bad_state():
    st = GateState.create(4, "cpu")
    t = st.tensors()
    t["counters"] = t["counters"].to(torch.int32)
    from dgg_fused.ops import gate_epilogue_

    with pytest.raises(RuntimeError, match="counters"):
        gate_epilogue_("cpp", torch.tensor(1.0), t, tau=0.3, std_floor=0.0, statistic=0, reference=0)
