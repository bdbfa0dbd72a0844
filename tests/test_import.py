"""Importing dgg_fused: cheap (neither torch._dynamo nor triton), and the core's modules import one way (no cycle,
no function-level import of another dgg_fused module closing one)."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import dgg_fused

ROOT = Path(dgg_fused.__file__).parent
#: Outside the core: they import the core, never the other way round (tests/test_import checks that too).
NOT_CORE = ("demo", "integrations")


def test_import_loads_neither_dynamo_nor_triton():
    code = (
        "import sys, dgg_fused\n"
        "from dgg_fused import GatedOptimizer, GateConfig, grad_sumsq, drift_stats\n"
        "import dgg_fused.energy, dgg_fused.checkpoint, dgg_fused.distributed, dgg_fused.gate, dgg_fused.testing\n"
        "bad = sorted(m for m in sys.modules if m == 'triton' or m.startswith(('torch._dynamo', 'triton.')))\n"
        "print('LOADED', bad)\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(ROOT.parent) + os.pathsep + env.get("PYTHONPATH", "")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "LOADED []" in out.stdout, out.stdout


def _module_name(path: Path) -> str:
    rel = path.relative_to(ROOT.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _resolve(mod: str, is_pkg: bool, level: int, name: str | None) -> str:
    base = mod.split(".") if is_pkg else mod.split(".")[:-1]
    if level > 1:
        base = base[: len(base) - (level - 1)]
    return ".".join(base + ([name] if name else []))


def _core_modules() -> dict[str, Path]:
    out = {}
    for path in ROOT.rglob("*.py"):
        rel = path.relative_to(ROOT)
        if rel.parts[0] in NOT_CORE:
            continue
        out[_module_name(path)] = path
    return out


def _imports(mods: dict[str, Path]):
    """(module, imported dgg_fused module, at module level?) for every import statement of the core."""
    for mod, path in mods.items():
        tree = ast.parse(path.read_text())
        is_pkg = path.name == "__init__.py"
        top = set(map(id, tree.body))
        for node in ast.walk(tree):
            targets = []
            if isinstance(node, ast.ImportFrom):
                if node.level:
                    base = _resolve(mod, is_pkg, node.level, node.module)
                    for a in node.names:
                        sub = f"{base}.{a.name}"
                        targets.append(sub if sub in mods else base)
                elif node.module and node.module.startswith("dgg_fused"):
                    targets.append(node.module)
            elif isinstance(node, ast.Import):
                targets += [a.name for a in node.names if a.name.startswith("dgg_fused")]
            for t in targets:
                yield mod, t, id(node) in top


def test_core_imports_form_no_cycle_and_are_all_at_module_level():
    mods = _core_modules()
    graph: dict[str, set[str]] = {m: set() for m in mods}
    lazy = []
    for src, dst, top in _imports(mods):
        if dst not in mods or dst == src:
            continue
        if not top:
            lazy.append((src, dst))
        graph[src].add(dst)
    assert not lazy, f"function-level imports of dgg_fused modules (a cycle closed lazily?): {lazy}"
    # no cycle among modules, ignoring the edge from a package to its own submodules' re-exports
    state: dict[str, int] = {}

    def visit(m: str, stack: list[str]) -> None:
        state[m] = 1
        for d in sorted(graph[m]):
            if d.startswith(m + "."):  # a package re-exporting its own submodules
                continue
            if state.get(d) == 1:
                raise AssertionError(f"import cycle: {' -> '.join(stack + [m, d])}")
            if d not in state:
                visit(d, stack + [m])
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [])


def test_the_core_never_imports_demo_or_integrations():
    for src, dst, _ in _imports(_core_modules()):
        assert not dst.startswith(("dgg_fused.demo", "dgg_fused.integrations")), (src, dst)


def _core_private_names() -> set[str]:
    """Private names the core defines: ``self._x`` attributes, ``_x`` functions, methods and module globals."""
    names: set[str] = set()
    for path in _core_modules().values():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store) and node.attr.startswith("_"):
                names.add(node.attr)
            elif isinstance(node, (ast.FunctionDef, ast.ClassDef)) and node.name.startswith("_"):
                names.add(node.name)
            elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store) and node.id.startswith("_"):
                names.add(node.id)
    return {n for n in names if not (n.startswith("__") and n.endswith("__"))}


def test_integrations_touch_nothing_private_of_the_core():
    """The integrations use the public seam (decide_ / apply_ / step_hooks, record_energy, ...), never a private
    attribute, function or module of the core: a grep of their source for the core's private names."""
    import torch

    private = _core_private_names()
    assert {"_gate", "_meter", "_plan"} <= private  # the scan sees the core's internals
    # and the torch.optim.Optimizer internals the wrapper sets up for itself (its step-hook dicts, ...)
    private |= {k for k in vars(torch.optim.SGD([torch.zeros(1, requires_grad=True)])) if k.startswith("_")}
    bad = []
    for path in sorted((ROOT / "integrations").glob("*.py")):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and node.attr in private:
                bad.append(f"{path.name}:{node.lineno}: .{node.attr}")
            elif isinstance(node, ast.ImportFrom) and node.level:
                mod = node.module or ""
                if any(part.startswith("_") for part in mod.split(".")):
                    bad.append(f"{path.name}:{node.lineno}: from {'.' * node.level}{mod}")
                bad += [f"{path.name}:{node.lineno}: import {a.name}" for a in node.names if a.name.startswith("_")]
    assert not bad, "private core names used by dgg_fused/integrations: " + ", ".join(bad)
