"""One harness for the tests that spawn several ranks (DeepSpeed, verl): a free loopback port, spawned workers with
a deadline, and each rank's result read back (a worker never raises: it pickles ``{"error": traceback}``)."""

from __future__ import annotations

import os
import pickle
import socket
import tempfile
import time
from typing import Any, Callable

import pytest
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rank_env(rank: int, world: int, port: int, **extra: str) -> None:
    """The torch.distributed environment of ``rank`` (loopback rendezvous, one intra-op thread)."""
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), OMP_NUM_THREADS="1", **extra)


def dump_result(outdir: str, rank: int, result: Any) -> None:
    """What a worker calls last (in a ``finally``): its result for :func:`run_ranks`."""
    with open(os.path.join(outdir, f"rank{rank}.pkl"), "wb") as f:
        pickle.dump(result, f)


def run_ranks(target: Callable[..., None], world: int, timeout_s: float, *args: Any, what: str = "workers") -> list:
    """Spawn ``target(rank, port, outdir, *args)`` for every rank; return their dumped results in rank order.

    Fails the test when a worker outlives ``timeout_s`` (a deadlock) or any rank reports an error."""
    with tempfile.TemporaryDirectory() as d:
        ctx = mp.get_context("spawn")
        port = free_port()
        procs = [ctx.Process(target=target, args=(r, port, d, *args)) for r in range(world)]
        for p in procs:
            p.start()
        deadline = time.monotonic() + timeout_s
        for p in procs:
            p.join(max(1.0, deadline - time.monotonic()))
        hung = [p for p in procs if p.is_alive()]
        for p in hung:
            p.kill()
        if hung:
            pytest.fail(f"{what} timed out after {timeout_s} s (deadlock?)")
        out = []
        for r in range(world):
            with open(os.path.join(d, f"rank{r}.pkl"), "rb") as f:
                out.append(pickle.load(f))
    for r, x in enumerate(out):
        if isinstance(x, dict) and "error" in x:
            pytest.fail(f"{what}: rank {r} of {world}:\n{x['error']}")
    return out
