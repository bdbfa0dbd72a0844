"""Shared test utilities: tiny models, optimizer factories, exact state comparison, the host-sync recorder."""

from __future__ import annotations

import copy
from typing import Callable

import torch
from torch import nn


class TinyLM(nn.Module):
    """Embedding -> MLP -> lm_head: enough structure for an optimizer to have several parameter groups."""

    def __init__(self, vocab: int = 37, hidden: int = 16, bias: bool = False) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, hidden)
        self.mlp = nn.Sequential(nn.Linear(hidden, hidden), nn.Tanh(), nn.Linear(hidden, hidden))
        self.lm_head = nn.Linear(hidden, vocab, bias=bias)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.lm_head(self.mlp(self.embed(ids)))


def make_model(seed: int = 0, **kw) -> TinyLM:
    torch.manual_seed(seed)
    return TinyLM(**kw)


def batch(seed: int, n: int = 8, vocab: int = 37) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (n,), generator=g), torch.randint(0, vocab, (n,), generator=g)


def loss_fn(model: nn.Module, data: tuple[torch.Tensor, torch.Tensor], scale: float = 1.0) -> torch.Tensor:
    ids, tgt = data
    return nn.functional.cross_entropy(model(ids), tgt) * scale


# name -> factory(params) ; covers the fused (sync-free) and host-decision paths
OPTIMIZERS: dict[str, Callable] = {
    "adamw_fused": lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=0.1, fused=True),
    "adamw_foreach": lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=0.1, foreach=True),
    "adamw_forloop": lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=0.1, foreach=False),
    "adam_fused": lambda p: torch.optim.Adam(p, lr=1e-2, fused=True),
    "adam_amsgrad": lambda p: torch.optim.Adam(p, lr=1e-2, amsgrad=True),
    "sgd_momentum_fused": lambda p: torch.optim.SGD(p, lr=1e-2, momentum=0.9, fused=True),
    "sgd_nesterov_fused": lambda p: torch.optim.SGD(p, lr=1e-2, momentum=0.9, nesterov=True, fused=True),
    "sgd_momentum": lambda p: torch.optim.SGD(p, lr=1e-2, momentum=0.9, dampening=0.1),
    "adagrad_fused": lambda p: torch.optim.Adagrad(p, lr=1e-2, fused=True),
    "adagrad": lambda p: torch.optim.Adagrad(p, lr=1e-2),
    "rmsprop": lambda p: torch.optim.RMSprop(p, lr=1e-3, momentum=0.5),
}
FUSED = {k for k in OPTIMIZERS if k.endswith("_fused")}


def snapshot(model: nn.Module, opt: torch.optim.Optimizer) -> tuple[dict, dict]:
    """Deep copies of parameters and of the (inner) optimizer state, for bit-exact comparison."""
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    names = {p: n for n, p in model.named_parameters()}
    state = {names[p]: copy.deepcopy(s) for p, s in opt.state.items()}
    return params, state


def assert_bit_identical(a: tuple[dict, dict], b: tuple[dict, dict], what: str = "") -> None:
    pa, sa = a
    pb, sb = b
    assert pa.keys() == pb.keys()
    for n in pa:
        assert torch.equal(pa[n], pb[n]), f"{what}: parameter {n} differs (max |d| = {(pa[n] - pb[n]).abs().max()})"
    assert sa.keys() == sb.keys(), f"{what}: optimizer state keys differ: {sorted(sa)} vs {sorted(sb)}"
    for n in sa:
        assert sa[n].keys() == sb[n].keys(), f"{what}: state of {n} has keys {sorted(sa[n])} vs {sorted(sb[n])}"
        for k in sa[n]:
            x, y = sa[n][k], sb[n][k]
            if isinstance(x, torch.Tensor):
                assert torch.equal(x, y), f"{what}: optimizer state {n}.{k} differs"
            else:
                assert x == y, f"{what}: optimizer state {n}.{k} differs: {x} vs {y}"


# ------------------------------------------------------------------ host-sync recorder
# The one detector, shared with the benchmarks: dgg_fused.testing (host copies, printing, syncs inside custom ops,
# and torch's sync debug mode on CUDA).
from dgg_fused.testing import SyncRecorder, record_syncs  # noqa: E402,F401
