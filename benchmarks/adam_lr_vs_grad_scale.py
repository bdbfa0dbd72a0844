"""Why ``GateConfig(action="scale")`` scales the learning rate, not the gradient: Adam normalises the gradient.

From the same state (a small LM trained ``warm`` steps with AdamW, ``fused=True``), one more step is taken three
ways: plain, with the gradient multiplied by f, and with the learning rate multiplied by f through the scale gate
(``GatedOptimizer(..., GateConfig(energy=False, drift="ess", drift_threshold=1.0, action="scale"))`` fed
``ess = f``, so its factor is exactly f). Printed: the norm of each step's parameter update relative to the plain
one's. CPU, deterministic; the figures in docs/rule.md come from this script.

    PYTHONPATH=. python benchmarks/adam_lr_vs_grad_scale.py
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from dgg_fused import GateConfig, GatedOptimizer


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Embedding(64, 32), nn.Linear(32, 32), nn.Tanh(), nn.Linear(32, 64))


def _loss(model: nn.Module, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    ids, tgt = torch.randint(0, 64, (32,), generator=g), torch.randint(0, 64, (32,), generator=g)
    return nn.functional.cross_entropy(model(ids), tgt)


def _flat(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1).double() for p in model.parameters()])


def update_ratios(f: float, warm: int, lr: float = 1e-3) -> tuple[float, float]:
    """(|update with grad x f| / |plain update|, |update with lr x f| / |plain update|) after ``warm`` steps."""
    model = _model()
    inner = torch.optim.AdamW(model.parameters(), lr=lr, fused=True)
    for s in range(warm):
        _loss(model, s).backward()
        inner.step()
        inner.zero_grad()
    updates = {}
    for how in ("plain", "grad", "lr"):
        m = copy.deepcopy(model)
        o = torch.optim.AdamW(m.parameters(), lr=lr, fused=True)
        o.load_state_dict(copy.deepcopy(inner.state_dict()))  # (load_state_dict would alias the tensors)
        before = _flat(m)
        _loss(m, warm).backward()
        if how == "grad":
            for p in m.parameters():
                p.grad.mul_(f)
        if how == "lr":
            gate = GatedOptimizer(o, lm_head=None, config=GateConfig(energy=False, drift="ess", drift_threshold=1.0,
                                                                        max_reuse=2, action="scale"))
            gate.set_reuse_index(2)
            gate.record_drift(ess=torch.tensor(f))
            gate.step()
            assert gate.get_metrics()["scale"] == torch.tensor(f).item()  # f in float32
        else:
            o.step()
        updates[how] = _flat(m) - before
    plain = updates["plain"].norm()
    return float(updates["grad"].norm() / plain), float(updates["lr"].norm() / plain)


def main() -> None:
    print("| f | after | update norm, gradient x f | update norm, lr x f (scale gate) |")
    print("|---|---|---|---|")
    for warm in (0, 1, 20, 200):
        for f in (0.5, 0.1, 0.01):
            g, lr = update_ratios(f, warm)
            print(f"| {f} | {warm} steps | {g:.4f} | {lr:.4f} |")


if __name__ == "__main__":
    main()
