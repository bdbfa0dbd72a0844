"""Independent testbed runs in worker processes (``--jobs``).

Every warm start and every run executes in a fresh *spawned* worker process, also with ``--jobs 1``: the worker
starts with the CPU code paths pinned (:mod:`dgg_fused.demo.numerics`: ATen AVX2, oneMKL COMPATIBLE, one thread),
whatever the caller's environment, so a run's numbers do not depend on the CPU, on which process runs it or on how
many run at once (every run also seeds all its randomness itself). Warm starts are trained first (one per task and
seed, written to the cache), then the runs load them.
"""

from __future__ import annotations

import json
import multiprocessing
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence

__all__ = ["Unit", "WarmFn", "run_unit", "execute"]


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

    def key(self) -> str:
        return json.dumps([self.task, self.cfg.lr, self.arm.name, self.seed], default=str)


_PREPARED: dict = {}


def _prepared(task_spec: str, cfg):
    from .run import prepare_task
    from .tasks import load_task

    k = (task_spec, cfg.model, cfg.n_heldout)
    if k not in _PREPARED:
        _PREPARED[k] = prepare_task(load_task(task_spec), cfg)
    return _PREPARED[k]


def _warm(task_spec: str, cfg, seed: int, cache_dir: str) -> tuple[str, int, bool, float]:
    from .warmstart import warm_start

    pt = _prepared(task_spec, cfg)
    t0 = time.time()
    _, cached = warm_start(pt.task, pt.tokenizer, cfg.model, cfg.warm, seed, cache_dir)
    return task_spec, seed, cached, time.time() - t0


def run_unit(u: Unit) -> dict[str, Any]:
    from . import numerics
    from .run import run_arm
    from .warmstart import warm_start

    pt = _prepared(u.task, u.cfg)
    state, _ = warm_start(pt.task, pt.tokenizer, u.cfg.model, u.cfg.warm, u.warm_seed, u.cache_dir)
    t0 = time.time()
    res = run_arm(pt, u.arm, u.cfg, u.seed, state, observe=u.observe)
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


@dataclass(frozen=True)
class WarmFn:
    cfg: Any
    cache: str

    def __call__(self, ts):
        return _warm(ts[0], self.cfg, ts[1], self.cache)


