"""The signals and the scale action on CUDA: torch's fused CUDA kernels read a float32 tensor lr as that float32 value
(bit-identical to the Python float), a scale gate's step is sync-free under torch's sync debug mode and exact, and
drift_stats / the energy decay stay on the device.

Skipped without a CUDA device (CI has none); run on a GPU machine with `pytest -m gpu tests/`.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from dgg_fused import GateConfig, GatedOptimizer, drift_stats
from dgg_fused.testing import record_syncs
from helpers import assert_bit_identical, batch, loss_fn, make_model, snapshot

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]
F32 = np.float32
ESS = GateConfig(energy=False, drift="ess", drift_threshold=0.5, action="scale")
FUSED = {
    "adamw": lambda p, lr: torch.optim.AdamW(p, lr=lr, weight_decay=0.1, fused=True),
    "adam": lambda p, lr: torch.optim.Adam(p, lr=lr, fused=True),
    "adam_amsgrad": lambda p, lr: torch.optim.Adam(p, lr=lr, amsgrad=True, fused=True),
    "sgd_momentum": lambda p, lr: torch.optim.SGD(p, lr=lr, momentum=0.9, fused=True),
    "sgd_nesterov": lambda p, lr: torch.optim.SGD(p, lr=lr, momentum=0.9, nesterov=True, weight_decay=0.01,
                                                  fused=True),
    "adagrad": lambda p, lr: torch.optim.Adagrad(p, lr=lr, lr_decay=0.01, fused=True),
}


def _cuda_batch(seed):
    ids, tgt = batch(seed)
    return ids.cuda(), tgt.cuda()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name", sorted(FUSED))
def test_a_float32_tensor_lr_is_its_python_float_on_cuda(name, dtype):
    """The exactness statement of docs/rule.md on CUDA: a 0-d float32 CUDA tensor lr v and the Python float(v) give
    the same bits (the kernels read *lr_ptr as float and widen it); the double lr * f itself does not in general."""
    v = torch.tensor(1e-2 * 0.37, dtype=torch.float64).to(torch.float32)
    outs = []
    for lr in (v.cuda(), float(v)):
        torch.manual_seed(0)
        ps = [torch.nn.Parameter(torch.randn(129, 7, device="cuda", dtype=dtype)),
              torch.nn.Parameter(torch.randn(5, device="cuda", dtype=dtype))]
        opt = FUSED[name](ps, 1.0)
        for step in range(4):
            g = torch.Generator(device="cuda").manual_seed(step)
            for p in ps:
                p.grad = torch.randn(p.shape, generator=g, device="cuda", dtype=dtype)
            opt.param_groups[0]["lr"] = lr
            opt.step()
        outs.append(([p.detach().clone() for p in ps], {i: dict(s) for i, s in enumerate(opt.state.values())}))
    for a, b in zip(outs[0][0], outs[1][0]):
        assert torch.equal(a, b), name
    for i in outs[0][1]:
        for k, t in outs[0][1][i].items():
            assert torch.equal(t, outs[1][1][i][k]), (name, k)


DRIFT = {(0, 2): 0.9, (0, 3): 0.25, (0, 4): 0.05, (1, 2): 0.4, (1, 3): float("nan"), (1, 4): 0.1}


def _factor(d):
    if not math.isfinite(d):
        return None
    return 1.0 if F32(d) >= F32(0.5) else float(F32(d) / F32(0.5))


@pytest.mark.parametrize("name", sorted(FUSED))
def test_scale_gate_is_sync_free_and_exact_on_cuda(name):
    runs = []
    for gated in (True, False):
        model = make_model().cuda()
        inner = FUSED[name](model.parameters(), 1e-2)
        opt = GatedOptimizer(inner, lm_head=None, config=ESS) if gated else inner
        for b in range(2):
            for k in range(1, 5):
                d = DRIFT.get((b, k), 1.0)
                loss_fn(model, _cuda_batch(10 * b + k)).backward()
                if gated:
                    opt.set_reuse_index(k)
                    opt.record_drift(ess=torch.tensor(d, device="cuda"))
                    if (b, k) == (0, 1):
                        opt.step()  # fused SGD's first step (momentum allocation) decides on the host
                    else:
                        torch.cuda.synchronize()
                        with record_syncs("cuda") as rec:
                            opt.step()
                        assert rec.events == [], (name, b, k, rec.events)
                elif _factor(d) is not None:
                    if k > 1:
                        inner.param_groups[0]["lr"] = float(F32(1e-2 * _factor(d)))
                    inner.step()
                    inner.param_groups[0]["lr"] = 1e-2
                opt.zero_grad()
        runs.append(snapshot(model, inner))
    assert_bit_identical(runs[0], runs[1], f"{name}: scale gate vs lr by hand, CUDA")


def test_drift_stats_and_energy_decay_stay_on_the_device():
    g = torch.Generator().manual_seed(0)
    old = -torch.rand(64, 999, generator=g) * 6
    new = old + torch.randn(64, 999, generator=g) * 0.3
    mask = torch.rand(64, 999, generator=g) > 0.3
    cpu = drift_stats(new, old, mask)
    new_c, old_c, mask_c = new.cuda(), old.cuda(), mask.cuda()
    torch.cuda.synchronize()
    with record_syncs("cuda") as rec:
        gpu = drift_stats(new_c, old_c, mask_c)
        big = drift_stats(torch.tensor([80.0, -80.0, 0.0], device="cuda"), torch.zeros(3, device="cuda"))
    assert rec.events == []
    for k in cpu:
        assert gpu[k].device.type == "cuda"
        assert gpu[k].item() == pytest.approx(cpu[k].item(), rel=1e-5, abs=1e-7), k
    assert big["ess"].item() == pytest.approx(1 / 3, rel=1e-6)

    model = make_model().cuda()
    opt = GatedOptimizer(torch.optim.AdamW(model.parameters(), fused=True), lm_head=model.lm_head, backend="torch",
                         config=GateConfig(energy=False, drift="energy_decay", drift_threshold=0.05))
    for k, scale in ((1, 1.0), (1, 1.0), (2, 0.5), (3, 1e-2)):
        opt.set_reuse_index(k)
        loss_fn(model, _cuda_batch(k), scale).backward()
        torch.cuda.synchronize()
        with record_syncs("cuda") as rec:
            opt.step()
        assert rec.events == [], (k, rec.events)
        opt.zero_grad()
    m = opt.get_metrics()
    assert m["gated"] == 1.0 and m["drift"] < 0.05 and opt.poll_reuse_stopped(block=True)
