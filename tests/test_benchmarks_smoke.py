"""Keep benchmarks/ from rotting: run a small subset at tiny shapes with timing disabled, and render the report.

Benchmarks are not tests: nothing here looks at a timing. The suites run in a subprocess (their own pytest
session, configured by benchmarks/conftest.py) with ``DGG_BENCH_SMOKE=1`` (tiny shapes, one round) on CPU.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "docs" / "benchmarks-cpu.json"


def test_benchmark_suites_run():
    env = dict(os.environ, DGG_BENCH_SMOKE="1", DGG_BENCH_DEVICE="cpu")
    cmd = [
        sys.executable, "-m", "pytest", "benchmarks/", "--benchmark-disable", "-q", "-x", "-p", "no:cacheprovider",
        "-p", "no:hypothesispytest", "-k", "Qwen2.5-0.5B or lm8",  # every method, backend and variant, on one lm_head shape and one param set
    ]
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, f"benchmarks/ smoke run failed:\n{r.stdout[-6000:]}\n{r.stderr[-3000:]}"
    assert " passed" in r.stdout


def _report_module():
    spec = importlib.util.spec_from_file_location("dgg_bench_report", ROOT / "benchmarks" / "report.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.skipif(not RESULTS.exists(), reason=f"{RESULTS.name} not committed")
def test_report_renders_committed_results():
    report = _report_module()
    text = report.render(json.loads(RESULTS.read_text()))
    for heading in ("Machine:", "### Energy op bandwidth", "### Gate overhead per optimizer step", "### Targets"):
        assert heading in text
    assert "| Qwen2.5-7B" in text
    # the rows and targets of issue 12: the compiled kernel alone, the read and floor rows, the floor-based target
    for needle in ("kernel[cpp]", "lm_head read alone", "sync-free floor", "max(1.5 x floor, floor + 1 point)"):
        assert needle in text, needle


def test_report_merges_runs():
    report = _report_module()
    data = json.loads(RESULTS.read_text()) if RESULTS.exists() else {"benchmarks": [], "machine_info": {}}
    one = dict(data, benchmarks=data["benchmarks"][:1])
    two = dict(data, benchmarks=data["benchmarks"][1:])
    merged = report.merge([one, two])
    assert [b.get("name") for b in merged["benchmarks"]] == [b.get("name") for b in data["benchmarks"]]
