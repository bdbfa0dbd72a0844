"""The RLVR testbed: end to end, determinism (threads, parallel processes), accounting, the frozen control."""

import dataclasses
import json
import math
import os

import pytest
import torch

from dgg_fused import GateConfig
from dgg_fused.demo.__main__ import main
from dgg_fused.demo.arms import FixedReuse, Gated, HostKLStop, OracleStop, parse_arm
from dgg_fused.demo.model import ModelConfig
from dgg_fused.demo.report import summarize
from dgg_fused.demo.run import DemoConfig, RunResult, prepare_task, run_arm
from dgg_fused.demo.tasks import ReversalTask
from dgg_fused.demo.warmstart import WarmStartConfig, cache_key, warm_start

TINY = DemoConfig(iters=3, prompts=4, group=4, minibatches=2, eval_every=3, n_heldout=8, warmup_iters=1, lr=1e-3,
                  model=ModelConfig(vocab_size=256, hidden_size=32, intermediate_size=64),
                  warm=WarmStartConfig(steps=150, batch=32))


@pytest.fixture(scope="module")
def small():
    task = ReversalTask(length=2, alphabet=3)
    pt = prepare_task(task, TINY)
    state, _ = warm_start(task, pt.tokenizer, TINY.model, TINY.warm, 0, None)
    res = run_arm(pt, parse_arm("k1", TINY.gate, TINY.target_kl), TINY, 0, state)
    rewards = [h.reward for h in res.history[1:]]
    assert 0.0 < min(rewards) and max(rewards) < 1.0  # non-trivial advantages: the arms really update
    return pt, state


def _numbers(res: RunResult):
    """Everything a run reports except wall-clock time."""
    d = res.to_dict()
    for h in d["history"]:
        h.pop("wall")
    return d


@pytest.fixture(scope="module")
def quick_cache(tmp_path_factory):
    return str(tmp_path_factory.mktemp("warm"))


def test_quick_end_to_end(tmp_path, capsys, quick_cache):
    out = tmp_path / "out"
    rc = main(["--quick", "--out", str(out), "--cache-dir", quick_cache, "--no-progress", "--jobs", "1",
               "--arms", "k1,naive,dgg"])
    assert rc == 0
    for f in ("results.json", "summary.csv", "report.md", "runs.jsonl", "expected_reward.png", "weight_change.png",
              "signals.png"):
        assert (out / f).stat().st_size > 0, f
    res = json.loads((out / "results.json").read_text())
    assert {r["arm"] for r in res["summary"]} == {"k1", "naive", "dgg"}
    assert {r["task"] for r in res["summary"]} == {"addition2", "reversal5"}
    printed = capsys.readouterr().out
    assert "| task | lr | arm |" in printed and "Harm oracle" in printed
    # --from-runs rebuilds the same report without training
    rebuilt = tmp_path / "rebuilt"
    main(["--from-runs", str(out / "runs.jsonl"), "--out", str(rebuilt), "--no-progress", "--no-plots",
          "--arms", "k1,naive,dgg"])
    assert (rebuilt / "report.md").read_text() == (out / "report.md").read_text()


def test_same_numbers_at_one_and_two_threads(small):
    pt, _ = small
    arm = parse_arm("naive", TINY.gate, TINY.target_kl)
    before = torch.get_num_threads()
    try:
        out = []
        for n in (1, 2):
            torch.set_num_threads(n)
            state, cached = warm_start(pt.task, pt.tokenizer, TINY.model, TINY.warm, 1, None)
            out.append((state, _numbers(run_arm(pt, arm, TINY, 1, state))))
            assert torch.get_num_threads() == n  # restored after the run
    finally:
        torch.set_num_threads(before)
    (s1, r1), (s2, r2) = out
    assert all(torch.equal(s1[k], s2[k]) for k in s1)
    assert r1 == r2


def test_cache_key_covers_what_the_warm_start_depends_on():
    t = ReversalTask(length=2, alphabet=3)
    k = cache_key(t, TINY.model, TINY.warm, 0)
    assert k != cache_key(t, TINY.model, TINY.warm, 1)
    assert k != cache_key(ReversalTask(length=2, alphabet=4), TINY.model, TINY.warm, 0)
    assert k != cache_key(t, dataclasses.replace(TINY.model, hidden_size=16), TINY.warm, 0)
    assert k != cache_key(t, TINY.model, dataclasses.replace(TINY.warm, label_noise=0.1), 0)
    assert k == cache_key(ReversalTask(length=2, alphabet=3), TINY.model, TINY.warm, 0)


def test_alone_and_in_parallel_give_the_same_runs(tmp_path, quick_cache):
    args = ["--quick", "--task", "reversal", "--arms", "k1,dgg", "--no-progress", "--no-plots", "--cache-dir",
            quick_cache]
    main(args + ["--out", str(tmp_path / "a"), "--jobs", "1"])
    main(args + ["--out", str(tmp_path / "b"), "--jobs", "2"])

    def runs(d):
        rows = [json.loads(x) for x in (tmp_path / d / "runs.jsonl").read_text().splitlines()]
        for r in rows:
            for h in r["history"]:
                h.pop("wall")
        return sorted(rows, key=lambda r: r["arm"])

    assert runs("a") == runs("b")
    assert (tmp_path / "a" / "report.md").read_text() == (tmp_path / "b" / "report.md").read_text()


def test_observing_does_not_change_the_run(small):
    pt, state = small
    arm = parse_arm("naive", TINY.gate, TINY.target_kl)
    plain = run_arm(pt, arm, TINY, 0, state)
    seen = run_arm(pt, arm, TINY, 0, state, observe=True)
    assert _numbers(plain)["history"] == _numbers(seen)["history"]
    n_steps = TINY.iters * arm.max_reuse * TINY.minibatches
    assert len(seen.steps) == n_steps and not plain.steps
    # the oracle's per-step changes add up to the run's change of expected reward
    total = sum(s["delta"] for s in seen.steps)
    assert total == pytest.approx(seen.history[-1].expected - seen.history[0].expected, abs=1e-9)
    assert {"z_energy", "energy", "approx_kl", "clip_frac", "ratio_max", "grad_norm"} <= set(seen.steps[0])


def test_frozen_policy_never_reaches_the_target(small):
    pt, state = small
    k1 = run_arm(pt, parse_arm("k1", TINY.gate, TINY.target_kl), TINY, 0, state)
    frozen = run_arm(pt, parse_arm("naive", TINY.gate, TINY.target_kl), dataclasses.replace(TINY, lr=0.0), 0, state)
    assert {h.expected for h in frozen.history} == {frozen.history[0].expected}  # lr 0: the policy never moves
    frozen = dataclasses.replace(frozen, arm="frozen", lr=k1.lr)  # judged against K=1's target of that seed
    rows = {r["arm"]: r for r in summarize([k1, frozen])}
    assert rows["frozen"]["censored"] is True
    assert rows["frozen"]["rollouts_to_target"] == k1.counts.rollouts  # censored at the budget
    assert rows["frozen"]["target"] >= rows["frozen"]["j0"] + 0.05


@pytest.mark.parametrize("spec", ["k1", "k2", "naive", "oracle", "kl", "kl:target_kl=1e-12", "dgg",
                                  "dgg:tau=1e-6,window=2,statistic=both,reference=all", "klgate",
                                  "klgate:target_kl=1e-12", "dgg-or-kl"])
def test_arm_accounting(small, spec):
    pt, state = small
    arm = parse_arm(spec, TINY.gate, TINY.target_kl)
    res = run_arm(pt, arm, TINY, 0, state)
    c = res.counts
    n = TINY.prompts * TINY.group
    mb = TINY.minibatches
    assert c.rollouts == TINY.iters * n and c.rollout_batches == TINY.iters
    assert [h.rollouts for h in res.history] == [i * n for i in range(TINY.iters + 1)]
    passes = [h.passes for h in res.history[1:]]
    steps = [h.steps for h in res.history[1:]]
    assert sum(passes) == c.passes and sum(steps) == c.steps_attempted
    assert all(1 <= p <= arm.max_reuse for p in passes) and all(s >= mb for s in steps)  # pass 1 is never cut
    # steps_applied is AdamW's own step counter (a dropped step is undone there), not derived from the gate
    if isinstance(arm, FixedReuse):
        assert passes == [arm.max_reuse] * TINY.iters
        assert c.steps_attempted == c.steps_applied == TINY.iters * arm.max_reuse * mb and c.trips == 0
    elif isinstance(arm, OracleStop):  # a rolled-back step is undone in AdamW's state too
        assert c.steps_applied + c.gated_steps == c.steps_attempted and c.gated_steps == c.trips <= TINY.iters
    elif isinstance(arm, HostKLStop):  # the host stop drops the step before backward: nothing gated
        assert c.steps_applied == c.steps_attempted and c.gated_steps == 0
        if arm.target_kl < 1e-9:  # any drift stops: one pass of steps, the second pass stops at its first step
            assert steps == [mb] * TINY.iters and passes == [2] * TINY.iters and c.trips == TINY.iters
    else:
        assert c.steps_applied + c.gated_steps == c.steps_attempted
        assert c.gated_steps == c.trips  # the loop breaks right after a trip
        assert c.trips <= TINY.iters
        if arm.gate.tau < 1e-3:  # tiny tau, window 2 (full after one batch): it must trip
            assert c.trips >= 1 and c.steps_applied < c.steps_attempted
        if arm.gate.drift is not None and arm.gate.drift_threshold < 1e-9:  # any drift trips: the first reuse step
            assert c.trips == TINY.iters and steps == [mb + 1] * TINY.iters
            assert c.steps_applied == TINY.iters * mb


def test_library_kl_gate_equals_the_host_kl_stop(small):
    """The drift gate (on the device, step dropped by found_inf after backward) and the host-side early stop
    (step never taken) make the same decisions and give the same run, bit for bit."""
    pt, state = small
    for thr in ("0.02", "0.005"):
        host = run_arm(pt, parse_arm(f"kl:target_kl={thr}", TINY.gate, TINY.target_kl), TINY, 0, state)
        dev = run_arm(pt, parse_arm(f"klgate:target_kl={thr}", TINY.gate, TINY.target_kl), TINY, 0, state)
        h, d = _numbers(host), _numbers(dev)
        assert [(x["expected"], x["passes"]) for x in h["history"]] == [(x["expected"], x["passes"]) for x in d["history"]]
        assert h["counts"]["steps_applied"] == d["counts"]["steps_applied"]
        assert h["counts"]["trips"] == d["counts"]["trips"]


def test_parse_arm_overrides_and_errors():
    g = GateConfig()
    a = parse_arm("dgg:tau=1.5,window=16,statistic=increment,reference=accepted,K=3", g, 0.02)
    assert isinstance(a, Gated) and a.max_reuse == 3
    assert (a.gate.tau, a.gate.window, a.gate.statistic, a.gate.reference, a.gate.max_reuse) == (
        1.5, 16, "increment", "accepted", 3)
    assert parse_arm("dgg", g, 0.02).gate == g  # the paper's rule is the library default
    assert parse_arm("kl:target_kl=0.05", g, 0.02) == HostKLStop("kl:target_kl=0.05", 4, 0.05)
    assert parse_arm("naive", g, 0.02).max_reuse == g.max_reuse
    assert parse_arm("k1", g, 0.02).max_reuse == 1 and parse_arm("k2", g, 0.02).max_reuse == 2
    for bad in ("dgg:bogus=1", "sgd", "dgg:statistic=nope", "k1:tau=1", "dgg:tau"):
        with pytest.raises(ValueError):
            parse_arm(bad, g, 0.02)


#: Callers' environments under which the documented row must come out the same: this machine as it is, and an
#: emulated other CPU (ATen's scalar kernels, oneMKL's AVX2 branch, oneDNN capped, our portable kernel, 2 threads).
#: The workers pin their own code paths (dgg_fused.demo.numerics), so none of this may change a number.
CALLER_ENVS = {
    "native": {},
    "emulated-other-cpu": {"ATEN_CPU_CAPABILITY": "default", "MKL_CBWR": "AVX2", "ONEDNN_MAX_CPU_ISA": "SSE41",
                           "DGG_FUSED_CPU_ISA": "portable", "OMP_NUM_THREADS": "2"},
}


@pytest.mark.parametrize("caller_env", sorted(CALLER_ENVS))
def test_documented_row_reproduces(tmp_path, capsys, monkeypatch, caller_env):
    """The command in docs/demo.md's "Reproduce one row" block, run end to end on a fresh (private) cache with the
    default --jobs, prints exactly the rows documented under it, whatever CPU paths the caller's environment asks
    for."""
    import pathlib
    import re
    import shlex

    for k, v in CALLER_ENVS[caller_env].items():
        monkeypatch.setenv(k, v)

    doc = (pathlib.Path(__file__).parent.parent / "docs" / "demo.md").read_text()
    block = doc.split("<!-- reproduce-row -->", 2)[1]
    cmd = re.search(r"^python -m dgg_fused\.demo (.*)$", block, re.M).group(1)
    rows = [ln for ln in block.splitlines() if ln.startswith("| ") and not ln.startswith("| task")]
    assert rows
    main(shlex.split(cmd) + ["--out", str(tmp_path / "out"), "--no-plots", "--no-progress"])
    printed = capsys.readouterr().out.splitlines()
    for row in rows:
        assert row in printed, row


def test_workers_pin_the_numerics_whatever_the_caller_asks(monkeypatch):
    """Every worker runs in the portable mode, also when the caller's environment asks for other code paths."""
    from dgg_fused.demo import numerics
    from dgg_fused.demo.jobs import execute

    for k, v in CALLER_ENVS["emulated-other-cpu"].items():
        monkeypatch.setenv(k, v)
    got = dict(execute(_worker_numerics, [0, 1], jobs=2))
    assert got == {0: (numerics.MODE, "AVX2"), 1: (numerics.MODE, "AVX2")}
    assert os.environ["ATEN_CPU_CAPABILITY"] == "default"  # the caller's environment is restored


def _worker_numerics(_):
    import torch

    from dgg_fused.demo import numerics

    return numerics.current(), torch.backends.cpu.get_cpu_capability()


def test_an_unpinned_process_says_so_and_gets_its_own_cache_key(monkeypatch):
    from dgg_fused.demo import numerics

    monkeypatch.delenv("DGG_FUSED_CPU_ISA", raising=False)
    with pytest.raises(RuntimeError, match="portable numerics"):
        numerics.check()  # this test process runs torch's native paths
    assert numerics.current().startswith("native:")
    t = ReversalTask(length=2, alphabet=3)
    k = cache_key(t, TINY.model, TINY.warm, 0)
    monkeypatch.setattr(numerics, "current", lambda: numerics.MODE)
    assert cache_key(t, TINY.model, TINY.warm, 0) != k


def test_oracle_prompts_are_disjoint_from_the_heldout_set(small):
    pt, _ = small
    held = {ex.prompt for ex in pt.heldout.examples}
    orc = [ex.prompt for ex in pt.oracle.examples]
    assert len(orc) == TINY.n_heldout and not held & set(orc)


def test_oracle_arm_keeps_exactly_the_steps_that_do_not_lower_the_oracle_j(small, monkeypatch):
    """The oracle arm's decisions, replayed: a kept reuse step never lowered the oracle set's J; an undone one did,
    and undoing it restores the weights and AdamW's state bit for bit (the next pass starts from them)."""
    from dgg_fused.demo import arms

    pt, state = small
    log = []
    orig_after = arms._OracleStrategy.after_step

    def after_step(self, k):
        before = None if k == 1 else self.j_before
        snap = self.snapshot
        stop = orig_after(self, k)
        if k > 1:
            now_params = {n: t.clone() for n, t in self.ctx.model.state_dict().items()}
            log.append((before, stop, snap, now_params, self.ctx.judge()))
        return stop

    monkeypatch.setattr(arms._OracleStrategy, "after_step", after_step)
    res = run_arm(pt, parse_arm("oracle", TINY.gate, TINY.target_kl), TINY, 0, state)
    assert log and res.counts.trips == sum(stop for _, stop, *_ in log)
    for before, stop, snap, params, j_now in log:
        if stop:  # undone: the weights are the snapshot's, bit for bit, so the oracle J is back where it was
            assert all(torch.equal(params[n], snap[0][n]) for n in params)
            assert j_now == before
        else:  # kept: the oracle J did not fall
            assert j_now >= before


def test_presets_and_policy_options_on_the_command_line():
    """--preset picks a policy's named configuration, the explicit knobs override it (per task too); the toy's
    fingerprint has no policy entry (its records from before the policies existed still resume), another
    policy's names it; misuse stops with a message."""
    from dgg_fused.demo.__main__ import _fingerprint, build_parser, config_from_args, policy_from_args
    from dgg_fused.demo.run import DemoConfig

    parse = build_parser().parse_args
    assert config_from_args(parse([])) == DemoConfig()
    _, preset = policy_from_args(parse(["--policy", "smollm2-135m", "--preset", "measure"]))
    assert preset.tasks == ("sum", "copy", "product") and preset.observe == ("naive",)
    args = parse(["--policy", "smollm2-135m", "--preset", "measure", "--prompts", "6", "--group", "4"])
    sum_cfg, copy_cfg = config_from_args(args, "sum"), config_from_args(args, "copy")
    assert (sum_cfg.prompts, sum_cfg.group, sum_cfg.iters, sum_cfg.n_heldout, sum_cfg.warmup_iters) == (6, 4, 20, 64, 5)
    assert copy_cfg.n_heldout == 48  # the measurement preset's per-task change
    assert config_from_args(parse(["--policy", "smollm2-135m", "--preset", "measure", "--heldout", "16"]),
                            "copy").n_heldout == 16
    d = config_from_args(parse(["--policy", "smollm2-135m"]))
    assert (d.iters, d.prompts, d.group, d.minibatches, d.n_heldout, d.lr, d.K) == (10, 4, 8, 2, 32, 3e-6, 4)
    assert set(json.loads(_fingerprint(DemoConfig()))) == {"config", "numerics"}
    assert json.loads(_fingerprint(DemoConfig(), {"policy": "p", "weights": "w"}))["policy"] == {"policy": "p",
                                                                                                "weights": "w"}
    for bad in (["--preset", "measure"], ["--quick", "--preset", "default"], ["--gguf", "x.gguf"],
                ["--policy", "smollm2-135m", "--warm-steps", "5"]):
        with pytest.raises((SystemExit, ValueError)):
            policy_from_args(parse(bad))
