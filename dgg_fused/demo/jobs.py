"""Independent testbed runs in worker processes (``--jobs``).

Every initial state (warm start, weight conversion) and every run executes in a fresh *spawned* worker process,
also with ``--jobs 1``: the worker starts with the CPU code paths pinned (:mod:`dgg_fused.demo.numerics`: ATen
AVX2, oneMKL COMPATIBLE, one thread), whatever the caller's environment, so a run's numbers do not depend on the
CPU, on which process runs it or on how many run at once (every run also seeds all its randomness itself). The
initial states are prepared first (one per :meth:`~dgg_fused.demo.policy.Policy.start_key`, written to the cache),
then the runs load them.
"""

from __future__ import annotations

import json
import multiprocessing
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence

__all__ = ["Unit", "prepare_start", "run_unit", "execute", "PROGRESS_EVERY_S"]

#: A running run prints a progress line at most this often (a run of the toy finishes before its first).
PROGRESS_EVERY_S = 30.0


@dataclass(frozen=True)
class Unit:
    """One run: everything a worker process needs (picklable)."""

    task: str
    cfg: Any
    arm: Any
    seed: int
    warm_seed: int
    cache_dir: str
    observe: bool
    policy: Any
    progress: bool = False

    def key(self) -> str:
        return json.dumps([self.task, self.cfg.lr, self.arm.name, self.seed], default=str)

    def label(self) -> str:
        return f"{self.task} lr {self.cfg.lr:g} seed {self.seed} {self.arm.name}"


_PREPARED: dict = {}


def _prepared(u: Unit):
    k = (u.policy, u.task, u.cfg.model, u.cfg.n_heldout, u.cache_dir)
    if k not in _PREPARED:
        _PREPARED[k] = u.policy.prepare(u.policy.load_task(u.task), u.cfg, u.cache_dir)
    return _PREPARED[k]


def prepare_start(u: Unit) -> tuple[bool, float]:
    """Prepare (or find in the cache) the initial state of ``u``'s runs: ``(from_cache, seconds)``."""
    t0 = time.time()
    _, cached = u.policy.initial_state(u.policy.load_task(u.task), u.cfg, u.warm_seed, u.cache_dir)
    return cached, time.time() - t0


class _Progress:
    """Prints ``[run] batch i/n: J ...`` to stderr, at most every :data:`PROGRESS_EVERY_S` seconds."""

    def __init__(self, u: Unit) -> None:
        self.u, self.t0, self.last = u, time.time(), time.time()

    def __call__(self, rec) -> None:
        now = time.time()
        if now - self.last >= PROGRESS_EVERY_S:
            self.last = now
            print(f"[{self.u.label()}] batch {rec.iter}/{self.u.cfg.iters}: J {rec.expected:.3f}, "
                  f"{rec.passes} passes ({now - self.t0:.0f}s)", file=sys.stderr, flush=True)


def run_unit(u: Unit) -> dict[str, Any]:
    from . import numerics
    from .run import run_arm

    pt = _prepared(u)
    state, _ = u.policy.initial_state(pt.task, u.cfg, u.warm_seed, u.cache_dir)
    t0 = time.time()
    res = run_arm(pt, u.arm, u.cfg, u.seed, state, observe=u.observe, on_iter=_Progress(u) if u.progress else None)
    d = res.to_dict()
    d["_elapsed"] = time.time() - t0
    d["_numerics"] = numerics.current()
    return d


def execute(fn: Callable, items: Sequence, jobs: int) -> Iterator[tuple[Any, Any]]:
    """Yield ``(item, fn(item))`` as they finish, computed in ``min(jobs, len(items))`` spawned worker processes
    with pinned numerics (:func:`dgg_fused.demo.numerics.init_worker`)."""
    if not items:
        return
    from . import numerics

    ctx = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=max(1, min(jobs, len(items))), mp_context=ctx,
                             initializer=numerics.init_worker) as ex:
        # a spawn pool starts its workers on submit: all of them start inside the pinned environment
        with numerics.pinned_environ():
            futs = {ex.submit(fn, it): it for it in items}
        for f in as_completed(futs):
            yield futs[f], f.result()
