"""The pre-registered threshold rule (dgg_fused.demo.calibrate) and the derived oracle signals, on hand cases."""

import json
import math

import pytest

from dgg_fused.demo.calibrate import calibrate, main, youden_threshold
from dgg_fused.demo.report import derived_steps


def test_youden_high_signal_separates_at_the_midpoint():
    # harmful steps have the high values: any threshold between 0.3 and 0.7 separates perfectly; the midpoint wins
    th = youden_threshold([0.1, 0.2, 0.3, 0.7, 0.8], [False, False, False, True, True], "high")
    assert th.threshold == 0.5 and th.tpr == 1.0 and th.fpr == 0.0 and th.youden == 1.0
    assert (th.harmful, th.beneficial) == (2, 3)


def test_youden_low_signal_trips_below():
    th = youden_threshold([0.9, 0.8, 0.2, 0.1], [False, False, True, True], "low")
    assert th.threshold == 0.5 and th.tpr == 1.0 and th.fpr == 0.0


def test_youden_partial_overlap_picks_the_best_index_and_ties_trip_fewer():
    # values 1..6, harmful at 2, 5, 6. Thresholds in the high frame: >5.5 -> J = 1/3; >4.5 -> 2/3; >3.5 -> 2/3 - 1/3;
    # >1.5 -> 1 - 2/3. Best 2/3 at 4.5 (fewer trips than any tie).
    vals = [1, 2, 3, 4, 5, 6]
    harm = [False, True, False, False, True, True]
    th = youden_threshold(vals, harm, "high")
    assert th.threshold == 4.5 and th.tpr == pytest.approx(2 / 3) and th.fpr == 0.0
    # a tie: harmful at 6 and 1 only -> J = 1/2 at > 5.5 and J = 1/2 - ... ; at < 1.5 (low frame) the same 1/2
    tie = youden_threshold([1, 2, 3, 4, 5, 6], [True, False, False, False, False, True], "high")
    assert tie.threshold == 5.5  # trips 1 step, not 6


def test_youden_rounds_to_two_significant_digits_and_reports_rates_there():
    th = youden_threshold([0.01234, 0.01301, 0.05], [False, False, True], "high")
    assert th.threshold == 0.032  # midpoint 0.031505 -> 0.032
    assert th.tpr == 1.0 and th.fpr == 0.0


def test_youden_with_no_useful_threshold_trips_nothing():
    th = youden_threshold([0.5, 0.6], [True, False], "high")  # harm on the lower value: no "high" threshold helps
    assert th.threshold == math.inf and th.tpr == 0.0 and th.fpr == 0.0


@pytest.mark.parametrize("bad", [dict(direction="up"), dict(harmful=[True]), dict(values=[1.0, float("nan")]),
                                 dict(harmful=[True, True])])
def test_youden_errors(bad):
    kw = dict(values=[1.0, 2.0], harmful=[True, False], direction="high") | bad
    with pytest.raises(ValueError):
        youden_threshold(kw["values"], kw["harmful"], kw["direction"])


def _step(batch, k, delta, energy, ess=0.9):
    return {"batch": batch, "reuse_index": k, "delta": delta, "energy": energy, "ess": ess,
            "log_ratio_m2": 1 - ess, "tv": (1 - ess) / 2}


def test_energy_decay_is_relative_to_the_batch_first_pass_mean():
    steps = [_step(1, 1, 0.1, 2.0), _step(1, 1, 0.1, 4.0), _step(1, 2, -0.1, 1.5), _step(2, 1, 0.1, 10.0),
             _step(2, 2, 0.2, 5.0)]
    d = derived_steps(steps)
    assert [s["energy_decay"] for s in d] == [2 / 3, 4 / 3, 0.5, 1.0, 0.5]
    assert "energy_decay" not in steps[0]  # the records are not modified
    assert derived_steps([{"batch": 1, "reuse_index": 2, "delta": 0.0, "energy": None}])[0]["energy_decay"] is None


def test_calibrate_command_end_to_end(tmp_path, capsys):
    steps = []
    for b in range(1, 5):
        steps += [_step(b, 1, 0.01, 4.0), _step(b, 2, 0.01, 3.0, ess=0.95), _step(b, 3, -0.01, 1.0, ess=0.61)]
    runs = [{"arm": "naive", "task": "t", "lr": 1e-3, "steps": steps}, {"arm": "k1", "task": "t", "lr": 1e-3,
                                                                         "steps": []}]
    p = tmp_path / "runs.jsonl"
    p.write_text("".join(json.dumps(r) + "\n" for r in runs))
    assert main([str(p), "--out", str(tmp_path / "cal.json")]) == 0
    doc = json.loads((tmp_path / "cal.json").read_text())
    th = doc["thresholds"]
    assert doc["runs"] == 1 and set(th) == {"ess", "log_ratio_m2", "tv", "energy_decay"}
    assert th["ess"]["direction"] == "low" and th["ess"]["threshold"] == pytest.approx(0.78)
    assert th["energy_decay"]["threshold"] == 0.5 and th["energy_decay"]["youden"] == 1.0
    assert th["log_ratio_m2"]["direction"] == "high" and th["log_ratio_m2"]["tpr"] == 1.0
    with pytest.raises(ValueError, match="no reuse step records"):
        calibrate([{"arm": "naive", "steps": [{"batch": 1, "reuse_index": 2, "delta": -1.0, "energy": None}]}],
                  ["ess"])
