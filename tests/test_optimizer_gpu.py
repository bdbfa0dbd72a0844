"""GatedOptimizer on CUDA: no host sync under torch's sync debug mode, exact skip, async reuse_stopped.

Skipped without a CUDA device (CI has none); run on a GPU machine with `pytest -m gpu tests/`.
"""

from __future__ import annotations

import pytest
import torch

from dgg_fused import GateConfig, GatedOptimizer
from dgg_fused.testing import internals
from helpers import assert_bit_identical, batch, loss_fn, make_model, snapshot

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]
TRIP = GateConfig(window=3, tau=5.0)


def _cuda_batch(seed):
    ids, tgt = batch(seed)
    return ids.cuda(), tgt.cuda()


@pytest.mark.parametrize("make_inner", [
    lambda p: torch.optim.AdamW(p, lr=1e-2, fused=True),
    lambda p: torch.optim.SGD(p, lr=1e-2, momentum=0.9, fused=True),
    lambda p: torch.optim.Adam(p, lr=1e-2, fused=True, capturable=True),
])
def test_step_is_sync_free_and_exact_on_cuda(make_inner):
    model = make_model().cuda()
    opt = GatedOptimizer(make_inner(model.parameters()), lm_head=model.lm_head, config=TRIP)
    for b in range(3):
        opt.set_reuse_index(1)
        loss_fn(model, _cuda_batch(b)).backward()
        opt.step()
        opt.zero_grad()
    torch.cuda.synchronize()
    opt.set_reuse_index(2)
    loss_fn(model, _cuda_batch(10), scale=1e3).backward()
    before = snapshot(model, opt)
    torch.cuda.set_sync_debug_mode("error")
    try:
        opt.step()  # gated
        tripped = opt.metrics["gated"].clone()  # a device copy: "gated" is the last step's, read after the next one
        opt.set_reuse_index(3)
        opt.step()  # stopped batch: skipped, but not a trip of its own
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert_bit_identical(before, snapshot(model, opt), "gated CUDA step")
    assert opt.poll_reuse_stopped(block=True)
    m = opt.get_metrics()
    assert tripped.item() == 1.0 and (m["gated"], m["skipped"]) == (0.0, 1.0)
    assert m["stopped_batches"] == 1 and m["gated_steps"] == 2


@pytest.mark.parametrize("micro", [1, 3])
def test_energy_hook_side_stream_matches_the_step_and_never_syncs(micro):
    """energy_hook=True on CUDA: the side-stream read is ordered after the accumulation and before the step (same
    bits as the step-time measurement, identical training run), and backward + step stay sync-free."""
    from dgg_fused.testing import record_syncs

    runs = []
    for hook in (False, True):
        model = make_model(bias=True).cuda()
        opt = GatedOptimizer(torch.optim.AdamW(model.parameters(), lr=1e-2, fused=True), lm_head=model.lm_head,
                             config=TRIP, max_grad_norm=0.05, energy_hook=hook)
        assert opt.energy_hook is hook
        energies = []
        for b in range(6):
            opt.set_reuse_index(b % 3 + 1)
            # host-to-device copies of the batches before the recorded region: each `.cuda()` of a pageable CPU
            # tensor is a synchronizing copy (the 2 warnings per backward of the first H200 run)
            data = [_cuda_batch(10 * b + i) for i in range(micro)]
            with record_syncs() as rec:
                for d in data:
                    loss_fn(model, d, 40.0 if b == 4 else 1.0).backward()
                if hook:
                    pending = internals(opt).meter.pending
                    assert pending is not None and pending.event is not None
                opt.step()
            if b > 0:  # the first step allocates optimizer state
                assert rec.events == [], rec.events
            energies.append(opt.metrics["energy"].clone())
            opt.zero_grad()
        runs.append((torch.stack(energies).cpu(), [p.detach().cpu() for p in model.parameters()]))
    assert torch.equal(runs[0][0], runs[1][0])
    assert all(torch.equal(a, b) for a, b in zip(runs[0][1], runs[1][1]))


def test_watch_is_the_bare_fused_optimizer_and_sync_free_on_cuda():
    """action="watch" on CUDA: the rule fires on the spike and is recorded, no step is dropped, no host sync, and
    the parameters and state equal the unwrapped fused AdamW's bit for bit."""
    import dataclasses

    runs = []
    for cfg in (None, dataclasses.replace(TRIP, action="watch")):
        model = make_model().cuda()
        inner = torch.optim.AdamW(model.parameters(), lr=1e-2, fused=True)
        opt = inner if cfg is None else GatedOptimizer(inner, lm_head=model.lm_head, config=cfg)
        data = [(b, k, _cuda_batch(10 * b + k)) for b in range(4) for k in (1, 2)]
        for i, (b, k, d) in enumerate(data):
            if cfg is not None:
                opt.set_reuse_index(k)
            loss_fn(model, d, 1e3 if (b, k) == (3, 2) else 1.0).backward()
            if i:  # the first step allocates optimizer state
                torch.cuda.set_sync_debug_mode("error")
            try:
                opt.step()
            finally:
                torch.cuda.set_sync_debug_mode("default")
            opt.zero_grad()
        runs.append((snapshot(model, opt), None if cfg is None else opt.get_metrics()))
    assert_bit_identical(runs[0][0], runs[1][0], "watch on CUDA")
    m = runs[1][1]
    assert m["gated"] == 1.0 and m["skipped"] == 0.0 and m["gated_steps"] == 0
