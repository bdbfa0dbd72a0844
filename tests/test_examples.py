"""The examples run as a user runs them, on a tiny random GGUF model (tests/tiny_gguf.py) in place of the 93 MB
SmolLM2 file: examples/trl_grpo.py and examples/plain_loop.py as scripts, and the verl config examples/verl_grpo.yaml
read here (and composed with verl's own config, in verl's venv, by tests/test_verl.py)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("gguf")
pytest.importorskip("transformers")
from tiny_gguf import write_tiny_gguf  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("examples")
    write_tiny_gguf(str(d / "tiny.gguf"))
    return d


def run_example(script: str, tiny: Path, *args: str) -> str:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p),
           "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, str(EXAMPLES / script), "--gguf", str(tiny / "tiny.gguf"), "--cache_dir",
           str(tiny / "cache"), *args]
    r = subprocess.run(cmd, cwd=tiny, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    return r.stdout


def steps(out: str) -> list[dict[str, str]]:
    """The dgg/* metrics printed on each step line."""
    return [dict(re.findall(r"(dgg/\w+)=(\S+)", line)) for line in out.splitlines() if "dgg/steps=" in line]


def test_trl_example_both_rules_say_which_tripped(tiny):
    out = run_example("trl_grpo.py", tiny, "--output_dir", str(tiny / "out"), "--max_steps", "6", "--dgg_window",
                      "2", "--learning_rate", "1e-2", "--dgg_drift_threshold", "1e-4")
    rows = steps(out)
    assert len(rows) == 6 and [r["dgg/steps"] for r in rows] == [str(i) for i in range(1, 7)]
    assert {"dgg/energy", "dgg/window_filled", "dgg/drift", "dgg/energy_trips", "dgg/drift_trips"} <= rows[0].keys()
    assert "dgg/window_fill" not in rows[0]  # one name per meaning (issue 18, edge 10)
    done = re.search(r"(\d+) trip\(s\): the energy rule fired on (\d+), the approx_kl rule on (\d+)", out)
    assert done and int(done[1]) >= 1 and int(done[3]) >= 1, out[-1500:]  # a KL of 1e-4 is exceeded at lr 1e-2
    assert re.search(r"rollouts generated at global steps \[0, ", out)


def test_trl_example_recommended_preset_logs_only_the_drift_rule(tiny):
    out = run_example("trl_grpo.py", tiny, "--output_dir", str(tiny / "out2"), "--max_steps", "4",
                      "--dgg_preset", "recommended")
    rows = steps(out)
    assert len(rows) == 4
    for r in rows:  # issue 18, edge 3: no NaN energy / statistic, no window count for a threshold rule
        assert not {"dgg/energy", "dgg/statistic", "dgg/window_filled", "dgg/energy_trips"} & r.keys(), r
        assert "dgg/drift" in r and "nan" not in r.values()
    assert "all by the approx_kl rule" in out
    assert "energy=False, drift='approx_kl'" in out  # GateConfig.recommended()


def test_plain_loop_example(tiny):
    out = run_example("plain_loop.py", tiny, "--window", "2", "--lr", "1e-2", "--drift_threshold", "1e-3",
                      "--batches", "2")
    rows = steps(out)
    assert rows and rows[0]["dgg/reuse_index"] == "1" and {"dgg/energy", "dgg/drift"} <= rows[0].keys()
    assert re.search(r"\d+ optimizer steps .* of 2 batches stopped early \(energy rule \d+, approx_kl rule \d+\)", out)


def test_the_examples_convert_the_gguf_file_once(tiny, tmp_path):
    """Issue 18, edge 11: a GGUF-loaded model refuses save_pretrained; the examples load the policy as the testbed
    does, converted once into a plain model and cached, which a Trainer can checkpoint."""
    sys.path.insert(0, str(EXAMPLES))
    try:
        from addition import load_policy
    finally:
        sys.path.remove(str(EXAMPLES))
    from dgg_fused.demo.lm import prepare_weights

    first, _ = prepare_weights(str(tiny / "tiny.gguf"), str(tiny / "cache"))
    again, cached = prepare_weights(str(tiny / "tiny.gguf"), str(tiny / "cache"))
    assert cached and again.path == first.path and len(list((tiny / "cache").glob("lm-*"))) == 1
    model, tokenizer = load_policy(str(tiny / "tiny.gguf"), str(tiny / "cache"))
    model.save_pretrained(tmp_path / "ckpt")  # what the Trainer's checkpoints do
    assert (tmp_path / "ckpt" / "model.safetensors").is_file() and tokenizer.padding_side == "left"


def test_verl_example_config_as_verl_reads_it():
    """The dgg entry is a valid GateConfig in the place verl's plugin reads it, with K <= max_reuse and the fused
    optimizer (read with PyYAML here; tests/test_verl.py composes the file with verl's own config in its venv)."""
    yaml = pytest.importorskip("yaml")
    from dgg_fused import GateConfig

    cfg = yaml.safe_load((EXAMPLES / "verl_grpo.yaml").read_text())
    assert cfg["defaults"] == ["ppo_trainer", "_self_"]
    actor = cfg["actor_rollout_ref"]["actor"]
    over = actor["optim"]["override_optimizer_config"]
    gate = GateConfig.from_dict(over["dgg"])
    assert actor["strategy"] == "fsdp2" and over["fused"] is True
    assert actor["ppo_epochs"] <= gate.max_reuse and gate.drift == "approx_kl" and gate.energy


def test_readme_points_to_the_examples():
    readme = (ROOT / "README.md").read_text()
    for name in ("examples/trl_grpo.py", "examples/plain_loop.py", "examples/verl_grpo.yaml"):
        assert name in readme and (ROOT / name).is_file(), name
