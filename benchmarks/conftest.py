"""pytest-benchmark configuration for the dgg_fused suites: machine info, and the markdown table at the end.

The suites import the library from this checkout (the repository root goes first on ``sys.path``), so a run
measures the code next to it even where the package is not installed.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

_HERE = Path(__file__).resolve().parent
_ROOT = _HERE.parent
for p in (str(_HERE), str(_ROOT)):
    if p not in sys.path:
        sys.path.insert(0, p)

import _common  # noqa: E402


def pytest_benchmark_update_machine_info(config, machine_info):
    import torch

    import dgg_fused

    info = {
        "cpu_model": _common.cpu_model(),
        "cpu_count": __import__("os").cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "device": str(_common.DEVICE),
        "device_name": torch.cuda.get_device_name(_common.DEVICE) if _common.IS_CUDA else None,
        "backends": dgg_fused.available_backends(),
        "loadavg_start": getattr(config, "_dgg_loadavg_start", None),
        "loadavg_end": _common.loadavg(),
    }
    info.update(_common.versions())
    machine_info["dgg_fused"] = info


def pytest_configure(config):
    config._dgg_loadavg_start = _common.loadavg()


@pytest.hookimpl(trylast=True)
def pytest_terminal_summary(terminalreporter, exitstatus, config):
    """Print the README table (benchmarks/report.py) after pytest-benchmark's own tables."""
    bs = getattr(config, "_benchmarksession", None)
    if bs is None or getattr(bs, "disabled", True) or not getattr(bs, "benchmarks", None):
        return
    try:
        import report

        machine = bs.get_machine_info()
        rows = [b.as_dict(include_data=False) for b in bs.benchmarks]
        text = report.render({"machine_info": machine, "benchmarks": rows})
    except Exception as exc:  # the table is a convenience: never fail a run over it
        terminalreporter.write_line(f"[dgg_fused] could not render the markdown report: {exc!r}")
        return
    terminalreporter.write_sep("-", "dgg_fused benchmark report (markdown; also: python benchmarks/report.py FILE.json)")
    terminalreporter.write_line(text)
