"""torch.distributed on CPU: 2 processes, gloo. DDP, FSDP2 (fully_shard, uneven splits), DTensor placements,
a hand-sharded vocab-parallel lm_head, tied embeddings under FSDP2, an FSDP2 checkpoint resume.

All scenarios run in one pair of spawned processes (a module fixture, so torch is imported twice, not twice per
test); each scenario records its results or its traceback per rank, and the tests below check them.
"""

from __future__ import annotations

import datetime
import os
import socket
import tempfile
import time
import traceback

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from dgg_fused import GateConfig, GatedOptimizer, grad_sumsq
from dgg_fused.distributed import global_grad_sumsq, set_energy_group
from dgg_fused.testing import internals

WORLD = 2
VOCAB = 37  # odd: FSDP2 splits the lm_head rows 19 / 18
HIDDEN = 8
BATCH = 8  # global; each rank takes BATCH // WORLD
TIMEOUT_S = 150

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed unavailable")


class Tiny(nn.Module):
    def __init__(self, tied: bool = False) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, HIDDEN)
        self.mlp = nn.Sequential(nn.Linear(HIDDEN, HIDDEN), nn.Tanh())
        self.lm_head = nn.Linear(HIDDEN, VOCAB, bias=not tied)
        if tied:
            self.lm_head.weight = self.embed.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.lm_head(self.mlp(self.embed(ids)))


def make(seed: int = 0, tied: bool = False) -> Tiny:
    torch.manual_seed(seed)
    return Tiny(tied)


def data(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 + step)
    return torch.randint(0, VOCAB, (BATCH,), generator=g), torch.randint(0, VOCAB, (BATCH,), generator=g)


def local(x: torch.Tensor, rank: int) -> torch.Tensor:
    n = BATCH // WORLD
    return x[rank * n : (rank + 1) * n]


def loss_of(model: nn.Module, ids: torch.Tensor, tgt: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    return nn.functional.cross_entropy(model(ids), tgt) * scale


def head_params(model: nn.Module) -> list[torch.Tensor]:
    return list(model.lm_head.parameters())


def reference_energy(step: int, tied: bool = False) -> float:
    """Single-process lm_head energy of the full-batch gradient (the gathered gradient)."""
    m = make(tied=tied)
    ids, tgt = data(step)
    loss_of(m, ids, tgt).backward()
    return float(grad_sumsq([p.grad for p in head_params(m)]))


def gather_scalar(x: torch.Tensor) -> list[torch.Tensor]:
    out = [torch.empty_like(x) for _ in range(WORLD)]
    dist.all_gather(out, x.contiguous())
    return out


def fsdp2(model: nn.Module) -> nn.Module:
    from torch.distributed.fsdp import fully_shard

    fully_shard(model.lm_head)
    fully_shard(model)
    return model


def snapshot(model: nn.Module, opt: torch.optim.Optimizer) -> list[torch.Tensor]:
    """Local shards of every parameter and every optimizer-state tensor (bit-exact comparison)."""

    def loc(t):
        return t.to_local().clone() if hasattr(t, "to_local") else t.detach().clone()

    out = [loc(p) for p in model.parameters()]
    for st in opt.state.values():
        out += [loc(v) for _, v in sorted(st.items()) if isinstance(v, torch.Tensor)]
    return out


def same(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b))


# ---------------------------------------------------------------------------------------------- scenarios
def sc_dtensor_placements(rank: int, tmp: str) -> dict:
    """global_grad_sumsq on DTensors: Shard(0) uneven and with an empty shard, Replicate, Partial, 2 layouts."""
    from torch.distributed.tensor import Partial, Replicate, Shard, distribute_tensor, init_device_mesh

    mesh = init_device_mesh("cpu", (WORLD,))
    g = torch.Generator().manual_seed(7)
    full = [torch.randn(37, 5, generator=g), torch.randn(1, 4, generator=g), torch.randn(6, generator=g)]
    sharded = [distribute_tensor(t, mesh, [Shard(0)]) for t in full]
    assert sharded[1].to_local().numel() == (4 if rank == 0 else 0)  # an empty shard
    rep = distribute_tensor(full[2], mesh, [Replicate()])
    part = torch.distributed.tensor.DTensor.from_local(full[0] / WORLD, mesh, [Partial()])  # sums to full[0]
    ref_all = float(grad_sumsq(full))
    e_shard = global_grad_sumsq(sharded)
    e_mixed = global_grad_sumsq([sharded[0], sharded[1], rep])  # two layouts, one all-reduce each
    e_part = global_grad_sumsq([part])
    return {
        "ref_all": ref_all,
        "shard": float(e_shard),
        "mixed": float(e_mixed),
        "partial": float(e_part),
        "ref_part": float(grad_sumsq([full[0]])),
        "dtype": str(e_shard.dtype),
        "shape": tuple(e_shard.shape),
        "gathered": [float(x) for x in gather_scalar(e_shard)],
    }


def sc_fsdp2_energy(rank: int, tmp: str) -> dict:
    """FSDP2 lm_head (uneven 19/18 rows, bias too): the optimizer's energy is the gathered gradient's."""
    model = fsdp2(make())
    opt = GatedOptimizer(torch.optim.AdamW(model.parameters(), lr=1e-2, fused=True), lm_head=model.lm_head)
    rows = model.lm_head.weight.to_local().shape[0]
    ids, tgt = data(0)
    loss_of(model, local(ids, rank), local(tgt, rank)).backward()
    e = opt.record_energy()
    return {"rows": rows, "energy": float(e), "ref": reference_energy(0), "gathered": [float(x) for x in gather_scalar(e)]}


def sc_tied_fsdp2(rank: int, tmp: str) -> dict:
    """Tied embedding/lm_head sharded together (fully_shard on the root): energy of the shared gradient."""
    from torch.distributed.fsdp import fully_shard

    model = make(tied=True)
    fully_shard(model)
    assert model.lm_head.weight is model.embed.weight
    opt = GatedOptimizer(torch.optim.AdamW(model.parameters(), lr=1e-2, fused=True), lm_head=model.lm_head)
    ids, tgt = data(0)
    loss_of(model, local(ids, rank), local(tgt, rank)).backward()
    e = opt.record_energy()
    return {"energy": float(e), "ref": reference_energy(0, tied=True), "gathered": [float(x) for x in gather_scalar(e)]}


def sc_vocab_parallel(rank: int, tmp: str) -> dict:
    """A hand-sharded vocab-parallel lm_head (plain tensors, uneven rows) with set_energy_group."""
    g = torch.Generator().manual_seed(3)
    full_w, full_grad = torch.randn(VOCAB, HIDDEN, generator=g), torch.randn(VOCAB, HIDDEN, generator=g)
    lo, hi = (0, 20) if rank == 0 else (20, VOCAB)
    w = nn.Parameter(full_w[lo:hi].clone())
    w.grad = full_grad[lo:hi].clone()
    opt = GatedOptimizer(torch.optim.SGD([w], lr=0.1, momentum=0.9, fused=True), lm_head=w)
    local_e = float(opt.record_energy())
    set_energy_group(opt, dist.group.WORLD)
    e = opt.record_energy()
    return {"local": local_e, "energy": float(e), "ref": float(grad_sumsq([full_grad]))}


def _train(model, opt, rank, steps, *, spikes=(), start=0, records=None, exact=None):
    """K=4 reuse loop; on `spikes` steps the loss is scaled (an energy spike). Records metrics per step."""
    for step in range(start, start + steps):
        k = step % 4 + 1
        opt.set_reuse_index(k)
        ids, tgt = data(step // 4)  # one "rollout batch" per 4 passes
        loss_of(model, local(ids, rank), local(tgt, rank), 300.0 if step in spikes else 1.0).backward()
        before = snapshot(model, opt) if exact is not None else None
        opt.step()
        opt.zero_grad()
        m = opt.get_metrics()
        if records is not None:
            records.append((step, m["energy"], m["statistic"], m["gated"], m["skipped"]))
        if exact is not None and m["skipped"]:
            exact.append(same(before, snapshot(model, opt)))


def sc_fsdp2_gate(rank: int, tmp: str) -> dict:
    """FSDP2 training with reuse: every rank takes every decision identically; gated steps are exact."""
    model = fsdp2(make())
    cfg = GateConfig(window=2, tau=2.0, max_reuse=4)
    opt = GatedOptimizer(torch.optim.AdamW(model.parameters(), lr=1e-2, fused=True), lm_head=model.lm_head, config=cfg)
    recs: list = []
    exact: list = []
    _train(model, opt, rank, 16, spikes={9, 14}, records=recs, exact=exact)
    # no host sync in step() under FSDP2 either (DTensor shards, the all-reduce, the fused found_inf path)
    from helpers import record_syncs

    syncs = []
    for k, scale in ((1, 1.0), (2, 1.0), (3, 300.0)):
        opt.set_reuse_index(k)
        ids, tgt = data(50)
        loss_of(model, local(ids, rank), local(tgt, rank), scale).backward()
        with record_syncs() as rec:
            opt.step()
        syncs += rec.events
        opt.zero_grad()
    tripped = opt.get_metrics()["gated"]
    return {"records": recs, "exact": exact, "path_found_inf": opt.plan.skip_path == "found_inf", "syncs": syncs, "tripped": tripped}


def _drift_chunks(rank: int) -> list:
    """Each rank's micro-batches of one step: rank 1 holds the step's largest log ratio (ESS rescaling across
    ranks) and an empty micro-batch."""
    g = torch.Generator().manual_seed(100 + rank)
    shapes = [(5, 3), (0,), (4,)] if rank else [(7,), (2, 2)]
    out = []
    for i, shape in enumerate(shapes):
        new = torch.randn(shape, generator=g) * 3.0 + (40.0 if rank and i == 2 else 0.0)
        old = torch.randn(shape, generator=g) * 0.1
        out.append((new, old, torch.rand(shape, generator=g) > 0.3))
    return out


def sc_drift_accumulator(rank: int, tmp: str) -> dict:
    from dgg_fused.integrations import DriftAccumulator

    acc = DriftAccumulator()
    for new, old, mask in _drift_chunks(rank):
        acc.add(new, old, mask)
    opt = GatedOptimizer(torch.optim.SGD(nn.Linear(2, 2).parameters(), lr=0.1), lm_head=None,
                         config=GateConfig(energy=False, drift="ess", drift_threshold=0.5))
    acc.record(opt)
    return {k: v.item() for k, v in internals(opt).pending_drift.items()}


def sc_ddp(rank: int, tmp: str) -> dict:
    """DDP: the gradients are all-reduced by DDP, the local energy is already global (no group needed)."""
    model = nn.parallel.DistributedDataParallel(make())
    opt = GatedOptimizer(
        torch.optim.AdamW(model.parameters(), lr=1e-2, fused=True),
        lm_head=model.module.lm_head,
        config=GateConfig(window=2, tau=2.0, max_reuse=4),
    )
    ids, tgt = data(0)
    loss_of(model, local(ids, rank), local(tgt, rank)).backward()
    e0 = opt.record_energy()
    first = {"energy": float(e0), "ref": reference_energy(0), "gathered": [float(x) for x in gather_scalar(e0)]}
    opt.zero_grad()
    recs: list = []
    exact: list = []
    _train(model, opt, rank, 16, spikes={9, 14}, records=recs, exact=exact)
    return {**first, "records": recs, "exact": exact}


def sc_fsdp2_checkpoint(rank: int, tmp: str) -> dict:
    """Save model + GatedOptimizer state (sharded, per rank) mid-run, resume in fresh objects: bit-exact."""
    cfg = GateConfig(window=2, tau=2.0, max_reuse=4)

    def fresh():
        m = fsdp2(make())
        o = GatedOptimizer(torch.optim.AdamW(m.parameters(), lr=1e-2, fused=True), lm_head=m.lm_head, config=cfg)
        return m, o

    spikes = {9, 13}
    model, opt = fresh()
    _train(model, opt, rank, 10, spikes=spikes)  # step 9 trips: the checkpoint holds a stopped batch
    path = os.path.join(tmp, f"ckpt_rank{rank}.pt")
    torch.save({"model": model.state_dict(), "optim": opt.state_dict()}, path)
    recs_a: list = []
    _train(model, opt, rank, 6, spikes=spikes, start=10, records=recs_a)
    final_a = snapshot(model, opt)

    model_b, opt_b = fresh()
    ck = torch.load(path, weights_only=False)
    model_b.load_state_dict(ck["model"])
    opt_b.load_state_dict(ck["optim"])
    opt_b.set_reuse_index(opt_b.reuse_index)
    recs_b: list = []
    _train(model_b, opt_b, rank, 6, spikes=spikes, start=10, records=recs_b)
    return {"recs_a": recs_a, "recs_b": recs_b, "exact": same(final_a, snapshot(model_b, opt_b))}


def sc_fsdp2_dcp(rank: int, tmp: str) -> dict:
    """The same resume through torch.distributed.checkpoint with dgg_fused.distributed.get/set_state_dict."""
    import torch.distributed.checkpoint as dcp

    from dgg_fused.distributed import get_state_dict, set_state_dict

    cfg = GateConfig(window=2, tau=2.0, max_reuse=4)

    def fresh(seed=0):
        m = fsdp2(make(seed))
        o = GatedOptimizer(torch.optim.AdamW(m.parameters(), lr=1e-2, fused=True), lm_head=m.lm_head, config=cfg)
        return m, o

    spikes = {9, 13}
    ckpt = os.path.join(tmp, "dcp")
    model, opt = fresh()
    _train(model, opt, rank, 10, spikes=spikes)
    msd, osd = get_state_dict(model, opt)
    dcp.save({"model": msd, "optim": osd}, checkpoint_id=ckpt)
    recs_a: list = []
    _train(model, opt, rank, 6, spikes=spikes, start=10, records=recs_a)
    final_a = snapshot(model, opt)

    model_b, opt_b = fresh(seed=1)  # different init: everything must come from the checkpoint
    msd_b, osd_b = get_state_dict(model_b, opt_b)  # the template dcp.load fills in place
    steps_after_template = opt_b.get_metrics()["steps"]  # torch's lazy state init must not run through the gate
    sd = {"model": msd_b, "optim": osd_b}
    dcp.load(sd, checkpoint_id=ckpt)
    set_state_dict(model_b, opt_b, model_state_dict=sd["model"], optim_state_dict=sd["optim"])
    recs_b: list = []
    _train(model_b, opt_b, rank, 6, spikes=spikes, start=10, records=recs_b)
    return {
        "recs_a": recs_a,
        "recs_b": recs_b,
        "exact": same(final_a, snapshot(model_b, opt_b)),
        "template_steps": steps_after_template,
    }


SCENARIOS = {
    "dtensor_placements": sc_dtensor_placements,
    "fsdp2_energy": sc_fsdp2_energy,
    "tied_fsdp2": sc_tied_fsdp2,
    "vocab_parallel": sc_vocab_parallel,
    "fsdp2_gate": sc_fsdp2_gate,
    "ddp": sc_ddp,
    "drift_accumulator": sc_drift_accumulator,
    "fsdp2_checkpoint": sc_fsdp2_checkpoint,
    "fsdp2_dcp": sc_fsdp2_dcp,
}


def _worker(rank: int, port: int, tmp: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=WORLD,
        timeout=datetime.timedelta(seconds=60),
    )
    results = {}
    try:
        for name, fn in SCENARIOS.items():
            try:
                results[name] = {"ok": fn(rank, tmp)}
            except Exception:  # recorded, reported by the test of that scenario
                results[name] = {"error": traceback.format_exc()}
            dist.barrier()
    finally:
        torch.save(results, os.path.join(tmp, f"results_rank{rank}.pt"))
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def results():
    with tempfile.TemporaryDirectory() as tmp:
        ctx = mp.start_processes(_worker, args=(_free_port(), tmp), nprocs=WORLD, join=False, start_method="spawn")
        deadline = time.monotonic() + TIMEOUT_S
        try:
            while not ctx.join(timeout=1.0):
                if time.monotonic() > deadline:
                    pytest.fail(f"distributed workers did not finish within {TIMEOUT_S}s")
        finally:
            for p in ctx.processes:
                if p.is_alive():
                    p.kill()
        yield [torch.load(os.path.join(tmp, f"results_rank{r}.pt"), weights_only=False) for r in range(WORLD)]


def get(results, name: str) -> list[dict]:
    out = []
    for r, res in enumerate(results):
        entry = res[name]
        if "error" in entry:
            pytest.fail(f"scenario {name} failed on rank {r}:\n{entry['error']}")
        out.append(entry["ok"])
    return out


def test_dtensor_placements(results):
    for r in get(results, "dtensor_placements"):
        assert r["dtype"] == "torch.float32" and r["shape"] == ()
        assert r["shard"] == pytest.approx(r["ref_all"], rel=1e-6)
        assert r["mixed"] == pytest.approx(r["ref_all"], rel=1e-6)  # Replicate is not double counted
        assert r["partial"] == pytest.approx(r["ref_part"], rel=1e-6)
        assert r["gathered"][0] == r["gathered"][1]  # bit-identical on every rank


def test_fsdp2_energy_uneven_equals_gathered_gradient(results):
    rs = get(results, "fsdp2_energy")
    assert sorted(r["rows"] for r in rs) == [18, 19]
    for r in rs:
        assert r["energy"] == pytest.approx(r["ref"], rel=1e-5)
        assert r["gathered"][0] == r["gathered"][1]


def test_tied_embeddings_under_fsdp2(results):
    for r in get(results, "tied_fsdp2"):
        assert r["energy"] == pytest.approx(r["ref"], rel=1e-5)
        assert r["gathered"][0] == r["gathered"][1]


def test_vocab_parallel_plain_tensors_with_energy_group(results):
    rs = get(results, "vocab_parallel")
    assert sum(r["local"] for r in rs) == pytest.approx(rs[0]["ref"], rel=1e-6)
    for r in rs:
        assert r["local"] < r["ref"]  # without the group a rank sees only its shard
        assert r["energy"] == pytest.approx(r["ref"], rel=1e-6)
    assert rs[0]["energy"] == rs[1]["energy"]


def _check_decisions(rs: list[dict]) -> None:
    recs = [r["records"] for r in rs]
    assert recs[0] == recs[1]  # energy, statistic, gated, skipped: identical on both ranks, every step
    gated = [s for s, _, _, g, _ in recs[0] if g]
    skipped = [s for s, _, _, _, sk in recs[0] if sk]
    assert 9 in gated and 14 in gated  # the spikes trip
    assert 10 in skipped and 11 in skipped  # the rest of a stopped batch is skipped
    assert any(not sk for s, _, _, _, sk in recs[0] if s % 4 != 0)  # some reuse steps pass
    for r in rs:
        assert r["exact"] and all(r["exact"])  # every skipped step left params and state bit-identical


def test_fsdp2_all_ranks_agree_and_gated_steps_are_exact(results):
    rs = get(results, "fsdp2_gate")
    assert all(r["path_found_inf"] for r in rs)  # the sync-free path works with DTensor params
    for r in rs:
        assert r["syncs"] == [] and r["tripped"] == 1.0  # no host sync in step(), gated step included
    _check_decisions(rs)


def test_drift_accumulator_reduces_over_ranks(results):
    """Every rank records drift_stats of all ranks' tokens (float64 reference on the concatenation)."""
    import math

    import numpy as np

    chunks = [c for r in range(WORLD) for c in _drift_chunks(r)]
    lr = torch.cat([(n.double() - o.double())[m] for n, o, m in chunks]).numpy()
    w = np.exp(lr - lr.max())
    ref = {"ess": w.sum() ** 2 / (lr.size * (w * w).sum()), "log_ratio_m2": float(np.mean(lr * lr)),
           "ratio_max": float(np.abs(lr).max()), "clip_frac": float(np.mean(np.abs(np.expm1(lr)) > 0.2))}
    rs = get(results, "drift_accumulator")
    assert rs[0] == rs[1]  # every rank decides alike
    for k, v in ref.items():
        assert math.isclose(rs[0][k], v, rel_tol=1e-5), (k, rs[0][k], v)


def test_ddp_needs_nothing(results):
    rs = get(results, "ddp")
    for r in rs:
        assert r["energy"] == pytest.approx(r["ref"], rel=1e-5)
        assert r["gathered"][0] == r["gathered"][1]
    _check_decisions(rs)


def test_fsdp2_checkpoint_resumes_bit_exact(results):
    for r in get(results, "fsdp2_checkpoint"):
        assert r["recs_a"] == r["recs_b"]
        assert any(g for *_, g, _ in r["recs_a"])  # the resumed segment contains a gated step
        assert r["exact"]


def test_fsdp2_dcp_checkpoint_resumes_bit_exact(results):
    for r in get(results, "fsdp2_dcp"):
        assert r["template_steps"] == 0
        assert r["recs_a"] == r["recs_b"]
        assert any(g for *_, g, _ in r["recs_a"])
        assert r["exact"]
