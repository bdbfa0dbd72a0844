"""The RLVR demo end to end (--quick) and the rollout/step accounting of every arm."""

import json

import pytest
import torch

from dgg_fused.demo.__main__ import main
from dgg_fused.demo.model import ModelConfig
from dgg_fused.demo.run import DemoConfig, parse_arm, prepare_task, run_arm
from dgg_fused.demo.tasks import ReversalTask
from dgg_fused.demo.warmstart import WarmStartConfig, warm_start


def test_quick_end_to_end(tmp_path, capsys):
    out = tmp_path / "out"
    rc = main(["--quick", "--out", str(out), "--cache-dir", str(tmp_path / "cache"), "--no-progress"])
    assert rc == 0
    for f in ("results.json", "summary.csv", "table.csv", "history.csv", "table.md", "reward_vs_rollouts.png",
              "reward_vs_wall.png", "dwd.png", "reuse_energy.png"):
        assert (out / f).stat().st_size > 0, f
    res = json.loads((out / "results.json").read_text())
    arms = {r["arm"] for r in res["runs"]}
    assert arms == {"k1", "naive", "k2", "kl", "dgg"}
    assert {r["task"] for r in res["runs"]} == {"addition2", "reversal5"}
    printed = capsys.readouterr().out
    assert "| task | arm |" in printed and "final reward" in printed
    # the warm start is cached: a second run loads it
    main(["--quick", "--out", str(out), "--cache-dir", str(tmp_path / "cache"), "--no-progress", "--no-plots",
          "--task", "reversal", "--arms", "k1"])
    assert "loaded from cache" in capsys.readouterr().out
    # --from-runs rebuilds the table (with per-seed comparisons) without training
    rebuilt = tmp_path / "rebuilt"
    main(["--from-runs", str(out / "runs.jsonl"), "--out", str(rebuilt), "--no-progress", "--no-plots"])
    printed = capsys.readouterr().out
    assert "| reversal5 | k1 |" in printed and "Per-seed comparisons" in printed
    assert (rebuilt / "table.md").stat().st_size > 0


@pytest.fixture(scope="module")
def small():
    task = ReversalTask(length=2, alphabet=3)
    cfg = DemoConfig(iters=3, prompts=4, group=4, minibatches=2, eval_every=3, n_eval=8, warmup_iters=1, lr=1e-3,
                     model=ModelConfig(vocab_size=256, hidden_size=32, intermediate_size=64),
                     warm=WarmStartConfig(steps=150, batch=32, label_noise=0.25))
    pt = prepare_task(task, cfg)
    state, _ = warm_start(task, pt.tokenizer, cfg.model, cfg.warm, 0, None)
    res = run_arm(pt, parse_arm("k1", cfg), cfg, 0, state)
    rewards = [h["reward"] for h in res["history"][1:]]
    assert 0.0 < min(rewards) and max(rewards) < 1.0  # non-trivial advantages: the arms really update
    return pt, cfg, state


@pytest.mark.parametrize("spec", ["k1", "k2", "naive", "kl", "kl:target_kl=1e-12", "dgg",
                                  "dgg:tau=1e-6,window=2,statistic=increment,reference=all",
                                  "dggu:tau=1e-6,window=2"])
def test_arm_accounting(small, spec):
    pt, cfg, state = small
    arm = parse_arm(spec, cfg)
    res = run_arm(pt, arm, cfg, 0, state)
    c = res["counts"]
    n = cfg.prompts * cfg.group
    assert c["rollouts"] == cfg.iters * n and c["rollout_batches"] == cfg.iters
    assert [h["rollouts"] for h in res["history"]] == [i * n for i in range(cfg.iters + 1)]
    per_batch = [h["iter_passes"] for h in res["history"][1:]]
    steps = [h["iter_steps"] for h in res["history"][1:]]
    assert all(1 <= p <= arm.max_reuse for p in per_batch)
    assert sum(per_batch) == c["passes"] and sum(steps) == c["steps_attempted"]
    if arm.kind == "fixed":
        assert per_batch == [arm.max_reuse] * cfg.iters
        assert c["steps_attempted"] == c["steps_applied"] == cfg.iters * arm.max_reuse * cfg.minibatches
    elif arm.kind == "kl":
        assert c["steps_applied"] == c["steps_attempted"]
        assert all(s >= cfg.minibatches for s in steps)  # pass 1 is never stopped
        if arm.target_kl < 1e-9:  # any drift stops: exactly one pass of steps, the second pass stops at once
            assert steps == [cfg.minibatches] * cfg.iters and per_batch == [2] * cfg.iters
            assert c["trips"] == cfg.iters
    else:
        # DGG: every attempted step is either applied or gated; pass 1 is never gated
        assert c["steps_applied"] + c["gated_steps"] == c["steps_attempted"]
        assert c["gated_steps"] == c["trips"]  # the loop breaks right after a trip
        assert all(s >= cfg.minibatches for s in steps)
        assert c["trips"] <= cfg.iters


def test_parse_arm_overrides_and_errors():
    cfg = DemoConfig()
    a = parse_arm("dgg:tau=1.5,window=16,statistic=increment,reference=accepted,K=3", cfg)
    assert (a.kind, a.max_reuse, a.gate.tau, a.gate.window, a.gate.statistic, a.gate.reference, a.gate.max_reuse) == (
        "dgg", 3, 1.5, 16, "increment", "accepted", 3)
    assert parse_arm("kl:target_kl=0.05", cfg).target_kl == 0.05
    assert parse_arm("naive", cfg).max_reuse == cfg.K
    with pytest.raises(ValueError):
        parse_arm("dgg:bogus=1", cfg)
    with pytest.raises(ValueError):
        parse_arm("sgd", cfg)
    with pytest.raises(ValueError):
        parse_arm("dgg:statistic=nope", cfg)


def test_prospective_adamw_update_matches_adamw():
    torch.manual_seed(0)
    from dgg_fused.demo.run import prospective_adamw_update

    p = torch.nn.Parameter(torch.randn(5, 3))
    opt = torch.optim.AdamW([p], lr=1e-2, weight_decay=0.0, fused=True)
    for _ in range(3):
        p.grad = torch.randn(5, 3)
        want = prospective_adamw_update(opt, p)
        before = p.detach().clone()
        opt.step()
        torch.testing.assert_close(p.detach() - before, want, rtol=1e-4, atol=1e-7)
