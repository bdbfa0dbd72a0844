"""torch.compile of a training step that calls GatedOptimizer.step(), on CPU.

What compiles (checked here): the whole step function with the gate, its energy op and the fused inner step is
captured; the only graph breaks are torch's own (``loss.backward()``, and the deliberate
``torch._dynamo.graph_break()`` in ``torch.optim.Optimizer``'s ``_use_grad_for_differentiable``, which every torch
optimizer hits): DGG adds none, and changing the reuse index or a skip decision does not recompile. The default
test uses the ``aot_eager`` backend (AOTAutograd + functionalization of the gate's in-place device state, the part
that can go wrong); the Inductor variant compiles C++ and takes over a minute on a small CPU: it runs with
``DGG_RUN_SLOW=1``.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

import dgg_fused
from dgg_fused import GateConfig, GatedOptimizer
from helpers import batch, loss_fn, make_model

PKG_DIR = str(Path(dgg_fused.__file__).parent)
SPIKE_STEP = 9
STEPS = 12


def _setup():
    model = make_model()
    opt = GatedOptimizer(
        torch.optim.AdamW(model.parameters(), lr=1e-2, fused=True),
        lm_head=model.lm_head,
        config=GateConfig(window=2, tau=3.0),
    )

    def train_step(ids, tgt, scale):
        loss = loss_fn(model, (ids, tgt)) * scale
        loss.backward()
        opt.step()
        opt.zero_grad()
        return loss.detach()

    return model, opt, train_step


def _args(step: int):
    ids, tgt = batch(step // 4)
    return ids, tgt, torch.tensor(300.0 if step == SPIKE_STEP else 1.0)


def _run(backend: str | None):
    torch._dynamo.reset()
    model, opt, fn = _setup()
    f = torch.compile(fn, backend=backend) if backend else fn
    decisions, exact, graphs = [], [], []
    for step in range(STEPS):
        opt.set_reuse_index(step % 4 + 1)
        before = [p.detach().clone() for p in model.parameters()]
        f(*_args(step))
        m = opt.get_metrics()
        decisions.append((m["gated"], m["skipped"]))
        if m["skipped"]:
            exact.append(all(torch.equal(a, p) for a, p in zip(before, model.parameters())))
        graphs.append(torch._dynamo.utils.counters["stats"]["unique_graphs"])
    return decisions, exact, [p.detach().clone() for p in model.parameters()], graphs


def test_gate_adds_no_graph_breaks():
    torch._dynamo.reset()
    _, opt, fn = _setup()
    opt.set_reuse_index(1)
    ex = torch._dynamo.explain(fn)(*_args(0))
    reasons = []
    for br in ex.break_reasons:
        inner = br.user_stack[-1] if br.user_stack else None
        reasons.append((br.reason.splitlines()[0], inner.filename if inner else ""))
        assert inner is None or not inner.filename.startswith(PKG_DIR), f"graph break inside dgg_fused: {br.reason}"
    # only torch's own: backward, and torch.optim's deliberate break around the inner step (which torch 2.14's
    # explain() counts in graph_break_count without listing it among break_reasons; older torch listed it)
    assert any("backward" in r for r, _ in reasons), reasons
    assert all("backward" in r or "graph_break()" in r for r, _ in reasons), reasons
    assert ex.graph_break_count <= 3, (ex.graph_break_count, reasons)


def _check(backend: str, exact_params: bool) -> None:
    dec_c, exact_c, params_c, graphs = _run(backend)
    dec_e, _, params_e, _ = _run(None)
    assert dec_c == dec_e  # the same gate decisions as eager
    assert (1.0, 1.0) in dec_c and sum(s for _, s in dec_c) < STEPS  # it trips, and not everywhere
    assert exact_c and all(exact_c)  # skipped steps leave the parameters bit-identical under compile
    for a, b in zip(params_c, params_e):
        if exact_params:
            assert torch.equal(a, b)
        else:
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert graphs[4] == graphs[-1], graphs  # new reuse indices / skip decisions do not recompile


def test_compiled_train_step_matches_eager_aot_eager():
    _check("aot_eager", exact_params=True)


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("DGG_RUN_SLOW") != "1", reason="Inductor C++ compile is slow on CPU: DGG_RUN_SLOW=1")
def test_compiled_train_step_matches_eager_inductor():
    _check("inductor", exact_params=False)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_graph_capture():
    """Whole-step capture (forward, backward, gated capturable fused AdamW) replays like eager; a gated replay is
    exact. Written for a GPU machine; not yet run (none was available when it was written)."""
    cfg = GateConfig(window=2, tau=50.0, std_floor=0.5)

    def setup():
        model = make_model().cuda()
        inner = torch.optim.AdamW(model.parameters(), lr=1e-2, fused=True, capturable=True)
        return model, GatedOptimizer(inner, lm_head=model.lm_head, config=cfg)

    static_ids, static_tgt = (t.cuda() for t in batch(0))
    static_scale = torch.ones((), device="cuda")

    def feed(step):
        ids, tgt = batch(step // 4)
        static_ids.copy_(ids)
        static_tgt.copy_(tgt)
        static_scale.fill_(1e3 if step == SPIKE_STEP else 1.0)

    model_g, opt_g = setup()

    def step_g():
        (loss_fn(model_g, (static_ids, static_tgt)) * static_scale).backward()
        opt_g.step()

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up outside the graph: steps 0-2 (k = 1, 2, 3)
        for step in range(3):
            opt_g.set_reuse_index(step % 4 + 1)
            feed(step)
            opt_g.zero_grad(set_to_none=True)
            step_g()
    torch.cuda.current_stream().wait_stream(side)
    opt_g.zero_grad(set_to_none=True)
    graph = torch.cuda.CUDAGraph()
    opt_g.set_reuse_index(4)
    feed(3)
    with torch.cuda.graph(graph):
        step_g()  # capture only: nothing ran yet for step 3
    decisions_g = []
    for step in range(3, STEPS):
        opt_g.set_reuse_index(step % 4 + 1)
        feed(step)
        before = [p.detach().clone() for p in model_g.parameters()]
        graph.replay()
        torch.cuda.synchronize()
        m = opt_g.get_metrics()
        decisions_g.append((m["gated"], m["skipped"]))
        if m["skipped"]:
            assert all(torch.equal(a, p) for a, p in zip(before, model_g.parameters()))

    model_e, opt_e = setup()  # the same sequence, eager
    decisions_e = []
    for step in range(STEPS):
        opt_e.set_reuse_index(step % 4 + 1)
        feed(step)
        opt_e.zero_grad(set_to_none=True)
        (loss_fn(model_e, (static_ids, static_tgt)) * static_scale).backward()
        opt_e.step()
        m = opt_e.get_metrics()
        if step >= 3:
            decisions_e.append((m["gated"], m["skipped"]))
    assert decisions_g == decisions_e
    assert (1.0, 1.0) in decisions_g
    for a, b in zip(model_g.parameters(), model_e.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
