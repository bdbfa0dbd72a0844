"""One harness for the tests that spawn several ranks (DeepSpeed, verl): a free loopback port, spawned workers with
a deadline, and each rank's result read back. A worker is a plain function ``target(rank, outdir, *args)`` that
returns its result; the harness sets the rank's environment, catches an exception as ``{"error": traceback}`` and
tears the process group down."""

from __future__ import annotations

import os
import pickle
import socket
import tempfile
import time
import traceback
from typing import Any, Callable

import pytest
import torch
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(target: Callable[..., Any], env: dict[str, str], rank: int, port: int, outdir: str, world: int,
               *args: Any) -> None:
    """The spawned process of one rank: the torch.distributed environment (loopback rendezvous, one intra-op
    thread), ``target``, its result (or the traceback) pickled for :func:`run_ranks`, the process group destroyed."""
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), OMP_NUM_THREADS="1", **env)
    torch.set_num_threads(1)
    try:
        result = target(rank, outdir, *args)
    except Exception:  # noqa: BLE001 - reported by run_ranks
        result = {"error": traceback.format_exc()}
    with open(os.path.join(outdir, f"rank{rank}.pkl"), "wb") as f:
        pickle.dump(result, f)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def run_ranks(target: Callable[..., Any], world: int, timeout_s: float, *args: Any,
              env: dict[str, str] | None = None, what: str = "workers") -> list:
    """Run ``target(rank, outdir, *args)`` in ``world`` spawned processes (``env``: extra environment variables);
    return their results in rank order.

    Fails the test when a worker outlives ``timeout_s`` (a deadlock) or any rank reports an error."""
    with tempfile.TemporaryDirectory() as d:
        ctx = mp.get_context("spawn")
        port = free_port()
        procs = [ctx.Process(target=_rank_main, args=(target, env or {}, r, port, d, world, *args))
                 for r in range(world)]
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
