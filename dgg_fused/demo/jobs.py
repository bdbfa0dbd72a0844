"""Independent testbed runs in parallel worker processes (``--jobs``).

Each worker is a fresh *spawned* interpreter with one torch intra-op thread; a run's numbers do not depend on
which process runs it or how many run at once (every run pins one thread and seeds all its randomness itself).
Warm starts are trained first (one per task and seed, written to the cache), then the runs load them.
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
    from .run import run_arm
    from .warmstart import warm_start

    pt = _prepared(u.task, u.cfg)
    state, _ = warm_start(pt.task, pt.tokenizer, u.cfg.model, u.cfg.warm, u.warm_seed, u.cache_dir)
    t0 = time.time()
    res = run_arm(pt, u.arm, u.cfg, u.seed, state, observe=u.observe)
    d = res.to_dict()
    d["_elapsed"] = time.time() - t0
    return d


def _init_worker() -> None:
    import torch

    torch.set_num_threads(1)


def execute(fn: Callable, items: Sequence, jobs: int) -> Iterator[tuple[Any, Any]]:
    """Yield ``(item, fn(item))`` as they finish: in this process for ``jobs == 1``, else in a spawn pool."""
    if jobs <= 1 or len(items) <= 1:
        for it in items:
            yield it, fn(it)
        return
    ctx = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=min(jobs, len(items)), mp_context=ctx, initializer=_init_worker) as ex:
        futs = {ex.submit(fn, it): it for it in items}
        for f in as_completed(futs):
            yield futs[f], f.result()


@dataclass(frozen=True)
class WarmFn:
    cfg: Any
    cache: str

    def __call__(self, ts):
        return _warm(ts[0], self.cfg, ts[1], self.cache)


