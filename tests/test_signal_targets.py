"""The targets and the recommendation rule of docs/signals.md (dgg_fused.demo.report.signal_targets / recommend), on
synthetic per-run rows whose checks are known by hand."""

import functools
import json
import math

import pytest

from dgg_fused.demo import report, stats
from dgg_fused.demo.report import (arm_signals, format_recommendation, format_signal_targets, mean_d_final_vs_k1,
                                   recommend, signal_targets)

@pytest.fixture(autouse=True)
def fewer_resamples(monkeypatch):
    """200 bootstrap resamples instead of 2000 (the CIs here are exact or far from 0): keeps the file fast."""
    monkeypatch.setattr(report, "paired_bootstrap", functools.partial(stats.paired_bootstrap, resamples=200))
    monkeypatch.setattr(report, "matched_bootstrap", functools.partial(stats.matched_bootstrap, resamples=200))


ESS = "gate:energy=false,drift=ess,drift_threshold=0.97"
TASKS = ("A", "B", "C")
BENIGN, MID, COLLAPSE = 3e-4, 6e-4, 1e-3
SEEDS = (0, 1, 2, 3)
NOISE = (0.0, 0.01, -0.01, 0.02)  # the same per-seed offset for every arm: paired differences are exact constants

#: (final J, rollouts to target) of each baseline arm per regime. Benign: naive needs half K=1's rollouts
#: (x K=1 = 2). Collapse: naive falls to 0.2, the oracle reaches 0.6; the best baseline is K=1 (0.5).
BASE = {
    BENIGN: {"k1": (0.5, 1000), "k2": (0.5, 700), "naive": (0.5, 500), "kl": (0.5, 800), "oracle": (0.52, 500)},
    MID: {"k1": (0.5, 1000), "k2": (0.5, 900), "naive": (0.4, 1000), "kl": (0.5, 900), "oracle": (0.55, 800)},
    COLLAPSE: {"k1": (0.5, 1000), "k2": (0.45, 1000), "naive": (0.2, 1000), "kl": (0.48, 1000),
               "oracle": (0.6, 1000)},
}


def _runs(arm, task, lr, fj, rt, offsets=NOISE):
    return [{"task": task, "lr": lr, "arm": arm, "seed": s, "final_j": fj + o, "rollouts_to_target": float(rt)}
            for s, o in zip(SEEDS, offsets)]


def grid(gates=None, skip=(), oracle_offsets=None):
    """Rows of the 3 x 3 grid: the baselines of BASE, plus ``gates`` ({arm: {lr: (final J, rollouts)}}, the same on
    every task); ``skip``: (arm, task, lr) cells left out; ``oracle_offsets``: {(task, lr): per-seed offsets}."""
    rows = []
    for task in TASKS:
        for lr, arms in BASE.items():
            for arm, (fj, rt) in {**arms, **{g: v[lr] for g, v in (gates or {}).items()}}.items():
                if (arm, task, lr) in skip:
                    continue
                off = (oracle_offsets or {}).get((task, lr)) if arm == "oracle" else None
                rows += _runs(arm, task, lr, fj, rt, off or NOISE)
    return rows


#: Equals naive in the benign cell and K=1 elsewhere: every check of T2-T4 is met.
GOOD = {BENIGN: (0.5, 500), MID: (0.5, 1000), COLLAPSE: (0.5, 1000)}
#: Equals K=1 everywhere: T2 and T4 met, T3 not (x K=1 = 1 < 1 + 0.9 (2 - 1)).
K1LIKE = {BENIGN: (0.5, 1000), MID: (0.5, 1000), COLLAPSE: (0.5, 1000)}


def sig_table(aucs):
    """Harm-oracle rows ({signal: (AUC on A, B, C) at the collapse lr}); the other lrs get AUC 0.99 (never read)."""
    out = []
    for i, task in enumerate(TASKS):
        for lr in BASE:
            row = {"task": task, "lr": lr, "arm": "naive"}
            for s, v in aucs.items():
                a = v[i] if lr == COLLAPSE else 0.99
                row[f"auc:{s}"] = (a, a - 0.1, a + 0.1)
            out.append(row)
    return out


SIG = sig_table({"ess": (0.75, 0.72, 0.5), "approx_kl": (0.6, 0.6, 0.6), "z_energy": (0.8, 0.8, 0.8),
                 "tv": (0.9, 0.69, 0.69)})


def test_arm_signals_from_the_arm_parser():
    assert arm_signals(ESS) == [("ess", "low")]
    assert arm_signals(ESS + ",action=scale") == [("ess", "low")]
    assert arm_signals(ESS + ",drift_direction=above") == [("ess", "high")]
    assert arm_signals("klgate:target_kl=0.03") == [("approx_kl", "high")]
    assert arm_signals("kl") == [("approx_kl", "high")]
    assert arm_signals("dgg") == [("z_energy", "high")]
    assert arm_signals("dgg-or-kl") == [("z_energy", "high"), ("approx_kl", "high")]
    assert arm_signals("gate:energy=false,drift=energy_decay,drift_threshold=0.085") == [("energy_decay", "low")]
    assert arm_signals("naive") == [] and arm_signals("oracle") == [] and arm_signals("nonsense:x=1") == []


def test_gate_equal_to_naive_when_benign_and_to_k1_in_collapse_meets_all_sixteen():
    st = signal_targets(grid({ESS: GOOD}), SIG, ESS)
    assert st["per_target"] == {"T1": (1, 1), "T2": (3, 3), "T3": (3, 3), "T4": (9, 9)}
    assert (st["met"], st["checks"], st["all_met"]) == (16, 16, True)
    t1 = st["t1"]
    assert [t["auc"] for t in t1["tasks"]] == [0.75, 0.72, 0.5] and (t1["tasks_met"], t1["needed"]) == (2, 2)
    for r in st["t2"]:
        assert r["d_vs_k1"].value == pytest.approx(0.0) and r["not_below_k1"]
        assert r["fraction_vs_naive"].value == pytest.approx((0.5 - 0.2) / (0.6 - 0.2))  # 0.75 >= 0.5
    for r in st["t3"]:
        assert r["lr"] == BENIGN and r["ratio_arm"] == 2.0 and r["ratio_naive"] == 2.0
        assert r["margin"].value == pytest.approx(0.1)  # (2 - 1) - 0.9 (2 - 1)
    assert all(r["met"] for r in st["t4"]) and {r["best"] for r in st["t4"]} == {"k1"}
    assert st["mean_d_final_vs_k1"] == pytest.approx(0.0)


def test_each_target_can_fail():
    # T3: K=1-like reuse keeps none of naive's benign gain (x = 1): 0 >= 0.9 is false on every task
    st = signal_targets(grid({ESS: K1LIKE}), SIG, ESS)
    assert st["per_target"] == {"T1": (1, 1), "T2": (3, 3), "T3": (0, 3), "T4": (9, 9)} and not st["all_met"]
    # just under 90% of naive's gain: x = 1.85 < 1.9 -> not met; just over: met
    for rt, ok in ((1000 / 1.85, False), (1000 / 1.95, True)):
        st = signal_targets(grid({ESS: {**GOOD, BENIGN: (0.5, rt)}}), SIG, ESS)
        assert st["per_target"]["T3"] == ((3 if ok else 0), 3)
    # T2 + T4: 0.01 below K=1 in collapse with no seed noise in the difference: the CI is [-0.01, -0.01]
    st = signal_targets(grid({ESS: {**GOOD, COLLAPSE: (0.49, 1000)}}), SIG, ESS)
    assert st["per_target"]["T2"] == (0, 3) and st["per_target"]["T4"] == (6, 9)
    assert all(not r["not_below_k1"] and r["share_met"] for r in st["t2"])  # share 0.725 is met, the CI is not
    # T2's share alone: at K=1's level only 0.3 / 0.4 of the oracle's gain is needed; 0.3 of 0.4 is 75%; a gate at
    # naive + 0.15 gets 37.5% -> not met (and below K=1 too)
    st = signal_targets(grid({ESS: {**GOOD, COLLAPSE: (0.35, 1000)}}), SIG, ESS)
    assert all(r["fraction_vs_naive"].value == pytest.approx(0.375) and not r["share_met"] for r in st["t2"])
    # T1: an AUC of 0.69 is below 0.70; tv reaches it on one task only
    tv = "gate:energy=false,drift=tv,drift_threshold=0.043"
    st = signal_targets(grid({tv: GOOD}), SIG, tv)
    assert st["per_target"]["T1"] == (0, 1) and st["t1"]["tasks_met"] == 1
    # T1 in the direction the arm trips: an ess gate tripping on *high* ess sees 1 - AUC
    up = ESS + ",drift_direction=above"
    st = signal_targets(grid({up: GOOD}), SIG, up)
    assert [t["auc"] for t in st["t1"]["tasks"]] == pytest.approx([0.25, 0.28, 0.5]) and not st["t1"]["met"]


def test_a_signal_missing_from_the_table_or_no_harm_oracle_fails_t1():
    m2 = "gate:energy=false,drift=log_ratio_m2,drift_threshold=0.066"
    st = signal_targets(grid({m2: GOOD}), SIG, m2)  # the table has no log_ratio_m2 column
    assert st["signals"] == ["log_ratio_m2"] and st["per_target"]["T1"] == (0, 1)
    assert all(math.isnan(t["auc"]) for t in st["t1"]["tasks"])
    st = signal_targets(grid({ESS: GOOD}), [], ESS)
    assert st["per_target"]["T1"] == (0, 1) and st["met"] == 15
    other = [{**r, "arm": "k2"} for r in SIG]  # a harm oracle on another arm is not naive's
    assert signal_targets(grid({ESS: GOOD}), other, ESS)["per_target"]["T1"] == (0, 1)


def test_two_signal_gate_counts_the_lower_auc():
    st = signal_targets(grid({"dgg-or-kl": GOOD}), SIG, "dgg-or-kl")
    assert st["signals"] == ["z_energy", "approx_kl"]
    assert st["t1"]["tasks"][0]["aucs"] == {"z_energy": 0.8, "approx_kl": 0.6}
    assert [t["auc"] for t in st["t1"]["tasks"]] == [0.6, 0.6, 0.6] and not st["t1"]["met"]
    assert signal_targets(grid({"dgg": GOOD}), SIG, "dgg")["t1"]["met"]  # z_energy alone: 0.8 on 3/3


def test_arm_missing_from_a_cell_fails_that_cells_checks_and_the_count_stays():
    rows = grid({ESS: GOOD}, skip={(ESS, "C", COLLAPSE), (ESS, "B", BENIGN)})
    st = signal_targets(rows, SIG, ESS)
    assert st["checks"] == 16 and st["per_target"] == {"T1": (1, 1), "T2": (2, 3), "T3": (2, 3), "T4": (7, 9)}
    c2 = next(r for r in st["t2"] if r["task"] == "C")
    b3 = next(r for r in st["t3"] if r["task"] == "B")
    assert not c2["met"] and c2["note"] == "no runs" and not b3["met"] and b3["note"] == "no runs"
    assert sum(r["note"] == "no runs" for r in st["t4"]) == 2
    assert st["cells_vs_k1"] == 7
    # a cell without K=1 and naive on the gate's seeds: T3 cannot be computed, not met
    rows = [r for r in grid({ESS: GOOD}) if not (r["task"] == "A" and r["lr"] == BENIGN and r["arm"] == "naive")]
    a3 = signal_targets(rows, SIG, ESS)["t3"][0]
    assert not a3["met"] and "no K=1 and naive" in a3["note"]


def test_oracle_gain_whose_ci_contains_zero_makes_the_share_na_and_t2_not_met():
    # on task B the oracle's gain over naive in collapse is +0.1 -0.1 +0.1 -0.1 around naive: mean 0, CI contains 0
    off = {("B", COLLAPSE): tuple(n - 0.4 + d for n, d in zip(NOISE, (0.1, -0.1, 0.1, -0.1)))}  # oracle = naive +- 0.1
    st = signal_targets(grid({ESS: GOOD}, oracle_offsets=off), SIG, ESS)
    b = next(r for r in st["t2"] if r["task"] == "B")
    g = b["oracle_gain_vs_naive"]
    assert g.lo <= 0 <= g.hi and math.isnan(b["fraction_vs_naive"].value)
    assert b["not_below_k1"] and not b["share_met"] and not b["met"] and "n/a" in b["note"]
    assert st["per_target"]["T2"] == (2, 3) and not st["all_met"]
    text = format_signal_targets([st])
    assert "| B | 0.001 |" in text and "| n/a | NOT met | NOT met |" in text


def test_oracle_below_naive_is_no_gain_to_share():
    off = {("A", COLLAPSE): (-0.5,) * 4}  # oracle 0.1 < naive 0.2, CI entirely below 0
    st = signal_targets(grid({ESS: GOOD}, oracle_offsets=off), SIG, ESS)
    a = st["t2"][0]
    assert a["oracle_gain_vs_naive"].hi < 0 and math.isnan(a["fraction_vs_naive"].value) and not a["met"]


def test_precomputed_fractions_give_the_same_answer():
    from dgg_fused.demo.report import oracle_fractions

    rows = grid({ESS: GOOD})
    fr = oracle_fractions(rows, ["k1", "k2", "naive", "kl", ESS])
    a, b = signal_targets(rows, SIG, ESS), signal_targets(rows, SIG, ESS, fractions=fr)
    assert json.dumps(a, default=repr) == json.dumps(b, default=repr)


def test_recommend_most_checks_then_mean_dj_then_a_tie():
    def st(arm, met, d, all_met=False):
        return {"arm": arm, "met": met, "checks": 16, "mean_d_final_vs_k1": d, "all_met": all_met,
                "t1": {"met": True, "tasks": [], "tasks_met": 0, "needed": 2, "note": ""},
                "t2": [], "t3": [], "t4": []}

    rec = recommend([st("a", 12, 0.05), st("b", 13, -0.1), st("c", 13, 0.0)])
    assert rec["arm"] == "c" and rec["tied"] == ["c"] and rec["met"] == 13  # b and c tie on checks: dJ decides
    rec = recommend([st("a", 13, 0.02), st("b", 13, 0.02), st("c", 13, float("nan"))])
    assert rec["arm"] == "a" and rec["tied"] == ["a", "b"]  # a true tie: both named, the rule does not decide
    assert "undecided" in format_recommendation(rec)
    assert recommend([st("x", 16, 0.0, True)])["all_met_arms"] == ["x"]
    assert recommend([])["arm"] is None


def test_recommendation_on_rows_names_what_it_misses():
    tv = "gate:energy=false,drift=tv,drift_threshold=0.043"
    rows = grid({ESS: K1LIKE, "dgg": GOOD, tv: GOOD, "twin": GOOD})
    sts = [signal_targets(rows, SIG, a) for a in (ESS, "dgg", tv, "twin")]
    assert [s["met"] for s in sts] == [13, 16, 15, 15]  # twin: "twin" parses to no signal
    rec = recommend(sts)
    assert rec["arm"] == "dgg" and rec["all_met"] and rec["all_met_arms"] == ["dgg"] and rec["misses"] == []
    rec = recommend([sts[0], sts[2], sts[3]])  # tv and twin: 15 checks and mean dJ 0 each -> a tie
    assert rec["tied"] == [tv, "twin"] and not rec["all_met"] and rec["all_met_arms"] == []
    assert rec["misses"] == ["T1 signal (AUC >= 0.70 on 1/3 tasks, needs 2)"]
    rec = recommend([sts[0]])
    assert rec["misses"] == ["T3 benign: A, B, C"]
    text = format_signal_targets(sts, recommend(sts), aliases={ESS: "C1 ess"}, oracle_d_vs_k1=0.1)
    assert "| C1 ess | ess | 1/1 | 3/3 | 0/3 | 9/9 | 13/16 | no | +0.000 |" in text
    assert f"* C1 ess = `{ESS}`" in text
    assert "Recommendation: `dgg`, 16/16 checks met" in text and "Arms meeting all four targets: `dgg`." in text
    assert "mean dJ vs K=1 over all cells +0.100" in text


def test_mean_d_final_vs_k1_over_all_cells():
    rows = grid({ESS: {BENIGN: (0.53, 500), MID: (0.5, 1000), COLLAPSE: (0.44, 1000)}})
    assert mean_d_final_vs_k1(rows, ESS) == pytest.approx((0.03 + 0.0 - 0.06) / 3)
    assert mean_d_final_vs_k1(rows, "oracle") == pytest.approx(((0.02 + 0.05 + 0.1) / 3))
    assert math.isnan(mean_d_final_vs_k1(rows, "absent"))


def _run_line(task, lr, arm, seed, level):
    hist = [{"iter": i, "rollouts": 64 * i, "wall": 0.0, "expected": 0.1 if i == 0 else level + 0.01 * seed,
             "reward": 0.5} for i in range(7)]
    return {"task": task, "lr": lr, "arm": arm, "arm_description": arm, "seed": seed, "exact": True,
            "history": hist, "counts": {"rollouts": 384, "rollout_batches": 6, "passes": 12},
            "weight_change": {}}


@pytest.mark.parametrize("with_oracle", [True, False])
def test_from_runs_report_has_the_section_only_with_an_oracle(tmp_path, capsys, with_oracle):
    from dgg_fused.demo.__main__ import main

    levels = {"k1": 0.5, "naive": 0.3, "oracle": 0.6, ESS: 0.5}
    lines = [_run_line(t, lr, a, s, lv) for t in ("A", "B") for lr in (BENIGN, COLLAPSE) for s in (0, 1)
             for a, lv in levels.items() if with_oracle or a != "oracle"]
    runs = tmp_path / "runs.jsonl"
    runs.write_text("".join(json.dumps(x) + "\n" for x in lines))
    out = tmp_path / "out"
    assert main(["--from-runs", str(runs), "--out", str(out), "--no-plots", "--no-progress"]) == 0
    text = (out / "report.md").read_text()
    res = json.loads((out / "results.json").read_text())
    assert ("Targets of docs/signals.md" in text) is with_oracle
    assert ("signal_targets" in res) is with_oracle
    if with_oracle:
        st = res["signal_targets"]
        assert [a["arm"] for a in st["arms"]] == [ESS] and st["arms"][0]["checks"] == 1 + 2 + 2 + 4
        assert st["recommendation"]["arm"] == ESS and "Recommendation: `" + ESS in text
        assert st["arms"][0]["per_target"]["T4"] == [4, 4]  # equal to K=1 everywhere
