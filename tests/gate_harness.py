"""Harness comparing a fused twin of the gate rule with the reference, state by state (used by tests/test_gate.py,
tests/test_kernels_triton_interpreted.py and tests/test_gpu_kernels.py)."""

from __future__ import annotations

import math
import random

import torch

from dgg_fused.config import REFERENCES, STATISTICS, GateConfig
from dgg_fused.gate import GateState, gate_step_

# ---------------------------------------------------------------------------------------------------- harness
# Drives a fused implementation and the reference gate_step_ through the same step sequences and compares the whole
# GateState after every step.
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
