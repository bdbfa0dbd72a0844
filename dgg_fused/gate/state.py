"""GateState: the device-resident state of one gate, and its checkpoint form (validated before anything is written)."""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

import torch

__all__ = ["GateState", "LAST_ENERGY", "LAST_STATISTIC", "LAST_GATED", "LAST_SKIPPED", "CNT_STEPS",
           "CNT_GATED_STEPS", "CNT_STOPPED_BATCHES"]  # fmt: skip

# Index of each scalar in ``GateState.last`` (the metrics of the most recent step).
LAST_ENERGY, LAST_STATISTIC, LAST_GATED, LAST_SKIPPED = range(4)
# Index of each counter in ``GateState.counters``.
CNT_STEPS, CNT_GATED_STEPS, CNT_STOPPED_BATCHES = range(3)


@dataclass
class GateState:
    """Device-resident state of one gate. All tensors live on the lm_head gradient's device.

    Attributes:
        window: ``(2, W)`` float32 shift buffer; row 0 holds reference energies, row 1 reference increments.
            The newest entry is at the end; the valid entries of a row are its last ``filled[row]`` ones.
        filled: ``(2,)`` int64, number of valid entries per row (at most W).
        prev_energy: ``()`` float32, the last finite energy observed (NaN before the first one).
        reuse_index: ``()`` int64, the current reuse pass k (1 = on-policy), written by :meth:`set_reuse_index`.
        stopped: ``()`` bool, the current batch has tripped the gate.
        counters: ``(3,)`` int64: steps, gated (skipped) steps, stopped batches.
        last: ``(4,)`` float32 metrics of the last step: energy, statistic (Z-score), gated (0/1), skipped (0/1).
        skip: ``()`` float32, 1.0 when the last step must not be applied, else 0.0 (the ``found_inf`` protocol).
        drift_window: ``(W,)`` float32 shift buffer of reference drift values (``drift_rule="zscore"`` only).
        drift_filled: ``()`` int64, number of valid entries of ``drift_window``.
        drift_last: ``(2,)`` float32 metrics of the last step's drift rule: value, statistic (the value itself
            for ``"threshold"``, its Z-score for ``"zscore"``); 0 until a drift statistic is observed.
        first_pass_energy: ``()`` float64, the sum of the current rollout batch's finite first-pass (k = 1) lm_head
            energies (``drift="energy_decay"`` only; 0 otherwise).
        first_pass_count: ``()`` int64, how many energies that sum holds. Both restart at the first
            :meth:`set_reuse_index` ``(1)`` after a reuse pass (a new batch).
        scale: ``()`` float32, the learning-rate factor of the last step (``action="scale"`` only: 1 on a first pass
            or a harmless statistic, in [0, 1) when scaled, 0 when the step was dropped); 1 otherwise.
        rule_trips: ``(2,)`` int64, with both rules on: the trips on which the energy rule / the drift rule fired
            (with ``combine="any"`` a trip may count in both; each is at most the trips counter).

    The fused twins (C++/CUDA, Triton) read and write the energy part (``window`` .. ``skip``); a gate watching a
    drift statistic runs the reference rule.
    """

    window: torch.Tensor
    filled: torch.Tensor
    prev_energy: torch.Tensor
    reuse_index: torch.Tensor
    stopped: torch.Tensor
    counters: torch.Tensor
    last: torch.Tensor
    skip: torch.Tensor
    drift_window: torch.Tensor
    drift_filled: torch.Tensor
    drift_last: torch.Tensor
    first_pass_energy: torch.Tensor
    first_pass_count: torch.Tensor
    scale: torch.Tensor
    rule_trips: torch.Tensor

    #: Tensors added after the first checkpoint format; a checkpoint without them loads with fresh values.
    OPTIONAL = ("drift_window", "drift_filled", "drift_last", "first_pass_energy", "first_pass_count", "scale",
                "rule_trips")

    @classmethod
    def create(cls, window: int, device: torch.device | str) -> "GateState":
        dev = torch.device(device)
        return cls(
            window=torch.zeros(2, window, dtype=torch.float32, device=dev),
            filled=torch.zeros(2, dtype=torch.int64, device=dev),
            prev_energy=torch.full((), float("nan"), dtype=torch.float32, device=dev),
            reuse_index=torch.ones((), dtype=torch.int64, device=dev),
            stopped=torch.zeros((), dtype=torch.bool, device=dev),
            counters=torch.zeros(3, dtype=torch.int64, device=dev),
            last=torch.zeros(4, dtype=torch.float32, device=dev),
            skip=torch.zeros((), dtype=torch.float32, device=dev),
            drift_window=torch.zeros(window, dtype=torch.float32, device=dev),
            drift_filled=torch.zeros((), dtype=torch.int64, device=dev),
            drift_last=torch.zeros(2, dtype=torch.float32, device=dev),
            first_pass_energy=torch.zeros((), dtype=torch.float64, device=dev),
            first_pass_count=torch.zeros((), dtype=torch.int64, device=dev),
            scale=torch.ones((), dtype=torch.float32, device=dev),
            rule_trips=torch.zeros(2, dtype=torch.int64, device=dev),
        )

    @property
    def device(self) -> torch.device:
        return self.skip.device

    @property
    def window_size(self) -> int:
        return self.window.shape[1]

    def tensors(self) -> dict[str, torch.Tensor]:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    def set_reuse_index(self, k: int) -> None:
        """Write the reuse pass k (tiny device writes, no sync); ``k == 1`` starts a new batch: clears stopped and,
        coming from a reuse pass (k > 1), restarts the first-pass energy mean (repeated ``k == 1`` calls within one
        first pass, e.g. one per micro-step, continue it)."""
        if k == 1:
            self.stopped.fill_(False)
            new_batch = self.reuse_index > 1
            self.first_pass_energy.masked_fill_(new_batch, 0.0)
            self.first_pass_count.masked_fill_(new_batch, 0)
        self.reuse_index.fill_(k)

    def metrics(self, config: Any) -> dict[str, torch.Tensor]:
        """The metrics of ``config``'s rule as 0-d device tensors (views of live state). Always: ``gated``,
        ``skipped``, ``steps``, ``gated_steps``, ``stopped_batches``, ``reuse_index``. The energy rule: ``energy``,
        ``statistic`` and ``window_filled`` (its window's observations: the row(s) ``config.statistic`` uses,
        ``"both"`` the emptier). A drift statistic: ``drift``, ``drift_statistic``, and with ``drift_rule="zscore"``
        ``drift_window_filled`` (its own window's observations). Both rules: ``energy_trips`` and ``drift_trips``
        (the trips on which each rule fired). ``drift="energy_decay"`` without the energy rule: ``energy`` (what the
        decay was computed from). ``action="scale"``: ``scale`` (the last step's learning-rate factor). A key
        appears only where the rule reads it: no NaN placeholders, no window count for a rule without a window."""
        out: dict[str, torch.Tensor] = {}
        if config.energy:
            stat = config.statistic
            filled = self.filled[0] if stat == "energy" else self.filled[1] if stat == "increment" else self.filled.min()
            out.update(energy=self.last[LAST_ENERGY], statistic=self.last[LAST_STATISTIC], window_filled=filled)
        elif config.reads_energy:  # a drift statistic computed from the energy (energy_decay): the energy it used
            out["energy"] = self.last[LAST_ENERGY]
        if config.drift is not None:
            out.update(drift=self.drift_last[0], drift_statistic=self.drift_last[1])
            if config.drift_rule == "zscore":
                out["drift_window_filled"] = self.drift_filled
        out.update(
            gated=self.last[LAST_GATED],
            skipped=self.last[LAST_SKIPPED],
            steps=self.counters[CNT_STEPS],
            gated_steps=self.counters[CNT_GATED_STEPS],
            stopped_batches=self.counters[CNT_STOPPED_BATCHES],
            reuse_index=self.reuse_index,
        )
        if config.action == "scale":
            out["scale"] = self.scale
        if config.energy and config.drift is not None:
            out.update(energy_trips=self.rule_trips[0], drift_trips=self.rule_trips[1])
        return out

    def metrics_host(self, config: Any) -> dict[str, float | int]:
        """:meth:`metrics` as Python numbers (counts as ``int``): one device-to-host copy (a sync)."""
        m = self.metrics(config)
        values = torch.stack([v.reshape(()).double() for v in m.values()]).cpu().tolist()
        return {k: v if m[k].is_floating_point() else int(v) for k, v in zip(m, values)}

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Copies of every tensor (a checkpoint must not alias live state)."""
        return {k: v.detach().clone() for k, v in self.tensors().items()}

    def load_state_dict(self, sd: dict[str, Any], *, max_reuse: int | None = None, action: str = "skip") -> None:
        """Copy a :meth:`state_dict` into this state in place (addresses stay stable for CUDA graphs).

        Validates every key, shape, dtype and value (``filled`` in [0, W], counters >= 0 and consistent,
        ``reuse_index`` in [1, ``max_reuse``], ``skip`` 0 or 1, ``last`` flags 0 or 1) before writing anything, so a
        bad checkpoint changes nothing. ``action``: the ``GateConfig.action`` of the gate loading it, whose states
        it must be one of (with ``"skip"`` every trip is a dropped step, so ``stopped_batches <= gated_steps``;
        under another action the rule fires without dropping). Reading the values is one host sync: loading is not a training step.
        """
        mine = self.tensors()
        if any(k not in sd for k in self.OPTIONAL):  # an older checkpoint: fresh drift state
            fresh = GateState.create(self.window_size, self.device).tensors()
            sd = {**{k: fresh[k] for k in self.OPTIONAL}, **sd}
        missing, unknown = set(mine) - set(sd), set(sd) - set(mine)
        if missing or unknown:
            raise ValueError(f"gate state: missing keys {sorted(missing)}, unexpected keys {sorted(unknown)}")
        for k, dst in mine.items():
            src = sd[k]
            if not isinstance(src, torch.Tensor) or src.shape != dst.shape or src.dtype != dst.dtype:
                got = (tuple(src.shape), src.dtype) if isinstance(src, torch.Tensor) else type(src).__name__
                raise ValueError(
                    f"gate state '{k}': expected shape {tuple(dst.shape)} dtype {dst.dtype}, got {got}"
                    " (was the checkpoint written with another GateConfig.window?)"
                )
        _check_values({k: sd[k] for k in mine}, self.window_size, max_reuse, action)
        for k, dst in mine.items():
            dst.copy_(sd[k])

    def to(self, device: torch.device | str) -> None:
        """Move every tensor to ``device`` (in place on this object)."""
        for k, v in self.tensors().items():
            setattr(self, k, v.to(device))


def _check_values(sd: dict[str, torch.Tensor], w: int, max_reuse: int | None, action: str) -> None:
    filled = sd["filled"].cpu().tolist()
    if any(not (0 <= f <= w) for f in filled):
        raise ValueError(f"gate state 'filled' must be in [0, {w}], got {filled}")
    k = int(sd["reuse_index"].cpu())
    hi = max_reuse if max_reuse is not None else 1 << 62
    if not (1 <= k <= hi):
        raise ValueError(f"gate state 'reuse_index' must be in [1, {max_reuse}], got {k}")
    steps, gated, trips = sd["counters"].cpu().tolist()
    if action == "skip":  # every trip drops its step
        if min(steps, gated, trips) < 0 or gated > steps or trips > gated:
            raise ValueError(f"gate state 'counters' must satisfy 0 <= stopped_batches <= gated_steps <= steps, got "
                             f"{[steps, gated, trips]}")
    elif min(steps, gated, trips) < 0 or gated > steps or trips > steps:  # the rule fires without dropping
        raise ValueError(f"gate state 'counters' must satisfy 0 <= gated_steps, stopped_batches <= steps (action="
                         f"{action!r}), got {[steps, gated, trips]}")
    skip = float(sd["skip"].cpu())
    last = sd["last"].cpu().tolist()
    if skip not in (0.0, 1.0) or last[LAST_GATED] not in (0.0, 1.0) or last[LAST_SKIPPED] not in (0.0, 1.0):
        raise ValueError(f"gate state: 'skip' and the gated/skipped flags of 'last' must be 0 or 1, got {skip}, {last}")
    rule_trips = sd["rule_trips"].cpu().tolist()
    if any(not (0 <= r <= trips) for r in rule_trips):
        raise ValueError(f"gate state 'rule_trips' must be in [0, stopped_batches={trips}], got {rule_trips}")
    df = int(sd["drift_filled"].cpu())
    if not (0 <= df <= w):
        raise ValueError(f"gate state 'drift_filled' must be in [0, {w}], got {df}")
    if k == 1 and bool(sd["stopped"].cpu()):
        raise ValueError("gate state: 'stopped' is set with reuse_index 1 (a new batch starts unstopped, and a first "
                         "pass never trips)")
    w_vals = sd["window"]
    for row in range(2):
        f = filled[row]
        if f and not bool(torch.isfinite(w_vals[row, w - f :]).all()):
            raise ValueError(f"gate state 'window' row {row} holds non-finite values among its {f} valid entries")
    if filled[0] and bool((w_vals[0, w - filled[0] :] < 0).any()):
        raise ValueError("gate state 'window' row 0 (energies, sums of squares) holds negative values")
    prev = float(sd["prev_energy"].cpu())
    if not (prev != prev or 0.0 <= prev < float("inf")):
        raise ValueError(f"gate state 'prev_energy' must be a finite energy >= 0 or NaN (none yet), got {prev}")
    if df and not bool(torch.isfinite(sd["drift_window"][w - df :]).all()):
        raise ValueError(f"gate state 'drift_window' holds non-finite values among its {df} valid entries")
    fp_sum, fp_n = float(sd["first_pass_energy"].cpu()), int(sd["first_pass_count"].cpu())
    if fp_n < 0 or not (0.0 <= fp_sum < float("inf")) or (fp_n == 0 and fp_sum != 0.0):
        raise ValueError(f"gate state: 'first_pass_energy' must be a finite sum >= 0 of 'first_pass_count' >= 0 "
                         f"energies (0 for none), got {fp_sum} over {fp_n}")
    sc = float(sd["scale"].cpu())
    if not (0.0 <= sc <= 1.0):
        raise ValueError(f"gate state 'scale' (a learning-rate factor) must be in [0, 1], got {sc}")
