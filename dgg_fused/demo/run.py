"""One testbed run: GRPO on one task from the policy's initial weights (the toy's warm start, the pretrained LM's
own weights), one arm, one seed, one learning rate.

Every arm gets the same prompts, sampling seeds, optimizer (fused AdamW) and schedule; each pass over a rollout
batch is split into ``minibatches`` optimizer steps; the arms differ only in how many passes they make and who
stops reuse (:mod:`dgg_fused.demo.arms`). After every rollout batch the run records the **exact expected reward**
on a fixed held-out prompt set (:mod:`dgg_fused.demo.evaluate`) — the primary metric — beside the batch's sampled
reward and, every ``eval_every`` batches, greedy held-out accuracy.

Determinism: a run pins torch to one intra-op thread while it runs (:func:`one_thread`), draws every random number
from generators seeded by ``(seed, batch)``, and so gives bit-identical numbers whatever the machine's thread
setting and whether it runs alone or beside other runs (``tests/test_demo.py`` checks both).

``observe=True`` adds the harm oracle (:class:`dgg_fused.monitor.HarmOracle`): the exact expected reward after
every optimizer step, and per step the candidate gate signals: the lm_head energy Z-score *as the gate computes
it* (a watch-only :class:`~dgg_fused.GatedOptimizer`, ``GateConfig(action="watch")``, read through ``get_metrics()``),
the raw energy, approximate KL, clip fraction, max |log ratio|, the pre-clip gradient norm and the reuse index.
Observing does not change the run (a test checks that naive K=4 is bit-identical with and without it).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import random
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Iterator

import torch

from .. import GateConfig
from ..monitor import DWDMonitor, HarmOracle
from .arms import Arm, RunContext
from .evaluate import HeldOut
from .grpo import Rollouts, group_advantages, ppo_clip_loss
from .model import ModelConfig
from .policy import HELDOUT_SEED, ORACLE_SEED, Policy, PreparedTask, ToyPolicy
from .tasks import Task
from .warmstart import WarmStartConfig

__all__ = ["DemoConfig", "PreparedTask", "prepare_task", "run_arm", "RunResult", "BatchRecord", "Counts",
           "one_thread", "HELDOUT_SEED", "ORACLE_SEED"]


@dataclass(frozen=True)
class DemoConfig:
    """Every knob of a testbed run (the command line maps onto these).

    ``gate`` is the paper's rule as the library defines it (``GateConfig()``): its ``max_reuse`` is K for every
    reuse arm, its ``tau`` / ``window`` / ``statistic`` / ``reference`` are DGG's. Nothing here repeats them.
    """

    iters: int = 30  # rollout batches per arm
    prompts: int = 8  # prompts per rollout batch
    group: int = 8  # G samples per prompt
    minibatches: int = 4  # optimizer steps per pass
    lr: float = 3e-4
    warmup_iters: int = 5  # linear LR warm-up over the first rollout batches
    clip_eps: float = 0.2
    max_grad_norm: float = 1.0
    target_kl: float = 0.02  # KL early stop (host peer and library drift gate)
    gate: GateConfig = field(default_factory=GateConfig)
    n_heldout: int = 64  # held-out prompts: exact expected reward every batch, greedy every eval_every
    eval_every: int = 10
    model: ModelConfig = field(default_factory=ModelConfig)
    warm: WarmStartConfig = field(default_factory=WarmStartConfig)

    @property
    def K(self) -> int:
        return self.gate.max_reuse

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def prepare_task(task: Task, cfg: DemoConfig, policy: Policy | None = None, cache_dir: str | None = None
                 ) -> PreparedTask:
    """``policy.prepare(task, cfg, cache_dir)`` (default: the toy policy)."""
    return (policy or ToyPolicy()).prepare(task, cfg, cache_dir)


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """Run the body with one torch intra-op thread (restored afterwards). At this model size one thread is as
    fast as two on a quiet machine and robust on a busy one; above all the numbers do not depend on it."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@dataclass
class BatchRecord:
    """After rollout batch ``iter`` (0: the warm start, before any update)."""

    iter: int
    rollouts: int
    wall: float
    expected: float  # exact expected reward on the held-out set (primary)
    reward: float = float("nan")  # mean sampled reward of this batch's rollouts (before its updates)
    passes: int = 0
    steps: int = 0  # steps attempted (backward ran)
    greedy: float | None = None  # greedy held-out accuracy, every eval_every batches


@dataclass
class Counts:
    rollouts: int = 0
    rollout_batches: int = 0
    passes: int = 0
    steps_attempted: int = 0
    steps_applied: int = 0  # read from AdamW's own step counter, independently of the gate
    gated_steps: int = 0  # the gate's count of dropped steps (GatedOptimizer arms)
    trips: int = 0  # batches whose reuse was stopped (gate trips or host KL stops)


@dataclass
class RunResult:
    """Everything one run reports (one line of runs.jsonl)."""

    task: str
    lr: float
    arm: str
    arm_description: str
    seed: int
    exact: bool  # is ``expected`` exact (False: a lower bound)
    history: list[BatchRecord]
    counts: Counts
    weight_change: dict[str, float]
    steps: list[dict[str, Any]] = field(default_factory=list)  # harm-oracle steps (observe=True)
    policy: str = "toy"
    tied_lm_head: bool = False  # weight_change["lm_head"] is the lm_head tied to the input embedding, counted once

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "RunResult":
        d = dict(d)
        d["history"] = [BatchRecord(**h) for h in d["history"]]
        d["counts"] = Counts(**d["counts"])
        return cls(**d)


def _rollouts(model, pt: PreparedTask, exs, group: int, gen: torch.Generator) -> Rollouts:
    codec, task = pt.codec, pt.task
    p_ids, p_mask = codec.encode([ex.prompt for ex in exs for _ in range(group)])
    c_ids, c_mask = codec.sample(model, p_ids, p_mask, task.max_new_tokens, generator=gen)
    texts = codec.decode(c_ids, c_mask)
    rewards = torch.tensor([task.verify(ex, t) for ex, t in zip((e for e in exs for _ in range(group)), texts)])
    with torch.no_grad():
        old = codec.logprobs(model, p_ids, p_mask, c_ids, c_mask)
    return Rollouts(p_ids, p_mask, c_ids, c_mask, old, rewards, group_advantages(rewards, group))


def _applied_steps(inner: torch.optim.Optimizer) -> int:
    """AdamW's own step count (a dropped step is undone there: ``found_inf``), independent of any gate."""
    for group in inner.param_groups:
        for p in group["params"]:
            st = inner.state.get(p)
            if st and "step" in st:
                return int(float(st["step"]))
    return 0


def run_arm(
    pt: PreparedTask,
    arm: Arm,
    cfg: DemoConfig,
    seed: int,
    warm_state: dict[str, torch.Tensor] | None,
    *,
    observe: bool = False,
    on_iter: Callable[[BatchRecord], None] | None = None,
) -> RunResult:
    """Train ``arm`` from ``warm_state`` (None: the policy's own initial weights, e.g. the pretrained LM's) for
    ``cfg.iters`` rollout batches at ``cfg.lr``; ``on_iter`` is called with each rollout batch's record. See the
    module doc."""
    with one_thread():
        return _Run(pt, arm, cfg, seed, warm_state, observe).train(on_iter)


class _Run:
    def __init__(self, pt: PreparedTask, arm: Arm, cfg: DemoConfig, seed: int, warm_state, observe: bool):
        self.pt, self.arm, self.cfg, self.seed = pt, arm, cfg, seed
        self.model = pt.policy.build_model(pt, cfg, seed)
        if warm_state is not None:
            self.model.load_state_dict(warm_state)
        self.model.train()
        self.inner = torch.optim.AdamW(self.model.parameters(), lr=cfg.lr, weight_decay=0.0, fused=True)
        # observed: the paper's rule evaluated without acting on it (GateConfig(action="watch"): never skips or
        # stops, so the wrapped step is the inner step, bit for bit)
        watch = dataclasses.replace(cfg.gate, action="watch") if observe else None
        self.strategy = arm.start(RunContext(self.model, self.inner, watch, self._judge))
        self.opt = self.strategy.opt
        self.oracle = HarmOracle(self._expected) if observe else None
        self.dwd = DWDMonitor(self.model, lm_head=self.model.lm_head, used_rows=pt.used_rows)
        self.counts = Counts()
        self.history: list[BatchRecord] = []
        self.wall = 0.0

    def _expected(self) -> float:
        return self._eval(self.pt.heldout)

    def _judge(self) -> float:
        return self._eval(self.pt.oracle)

    def _eval(self, prompts: HeldOut) -> float:
        self.model.eval()
        v = prompts.expected_reward(self.model)
        self.model.train()
        return v

    def _record(self, it: int, **kw: Any) -> None:
        greedy = None
        if it % self.cfg.eval_every == 0 or it == self.cfg.iters:
            self.model.eval()
            greedy = self.pt.heldout.greedy_accuracy(self.model)
            self.model.train()
        self.history.append(BatchRecord(it, self.counts.rollouts, self.wall, self._expected(), greedy=greedy, **kw))

    def train(self, on_iter: Callable[[BatchRecord], None] | None) -> RunResult:
        cfg = self.cfg
        self._record(0)
        for it in range(1, cfg.iters + 1):
            t0 = time.perf_counter()
            for g in self.opt.param_groups:
                g["lr"] = cfg.lr * min(1.0, it / max(1, cfg.warmup_iters))
            exs = self.pt.task.make_prompts(random.Random(self.seed * 1_000_003 + it), cfg.prompts)
            gen = torch.Generator().manual_seed(self.seed * 1_000_003 + it)
            self.model.eval()
            ro = _rollouts(self.model, self.pt, exs, cfg.group, gen)
            self.model.train()
            self.counts.rollouts += len(ro)
            self.counts.rollout_batches += 1
            passes, steps, t_obs = self._batch(it, ro)
            self.wall += time.perf_counter() - t0 - t_obs
            self._record(it, reward=float(ro.rewards.mean()), passes=passes, steps=steps)
            if on_iter is not None:
                on_iter(self.history[-1])
        c = self.counts
        c.steps_applied = _applied_steps(self.inner)
        c.gated_steps, c.trips = self.strategy.counts()
        g = self.pt.heldout
        return RunResult(
            task=self.pt.task.name, lr=cfg.lr, arm=self.arm.name, arm_description=self.arm.describe(),
            seed=self.seed, exact=g.exact, history=self.history, counts=c,
            weight_change=self.dwd.weight_change(), steps=self.oracle.steps if self.oracle else [],
            policy=self.pt.policy.name, tied_lm_head=self.dwd.tied,
        )

    def _batch(self, it: int, ro: Rollouts) -> tuple[int, int, float]:
        """The passes over one rollout batch; returns (passes, steps attempted, seconds spent observing)."""
        cfg, arm, strat, opt, model = self.cfg, self.arm, self.strategy, self.opt, self.model
        n = len(ro)
        mb = math.ceil(n / cfg.minibatches)
        shuffle = torch.Generator().manual_seed(self.seed * 7_000_003 + it)
        passes = steps = 0
        t_obs = 0.0
        stop = False
        for k in range(1, arm.max_reuse + 1):
            if not strat.begin_pass(k):
                break
            passes += 1
            perm = torch.randperm(n, generator=shuffle)
            for i in range(0, n, mb):
                idx = perm[i : i + mb]
                logp = self.pt.codec.logprobs(model, ro.prompt_ids[idx], ro.prompt_mask[idx], ro.comp_ids[idx],
                                              ro.comp_mask[idx])
                loss, st = ppo_clip_loss(logp, ro.old_logp[idx], ro.advantages[idx], ro.comp_mask[idx],
                                         cfg.clip_eps)
                if not strat.allow(k, st):
                    stop = True
                    break
                loss.backward()
                steps += 1
                strat.before_step(k, logp, ro.old_logp[idx], ro.comp_mask[idx], cfg.clip_eps)
                gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
                if self.oracle is not None:
                    t1 = time.perf_counter()
                    self.oracle.begin_step(batch=it, reuse_index=k, approx_kl=float(st["approx_kl"]),
                                           clip_frac=float(st["clipfrac"]), ratio_max=float(st["ratio_max"]),
                                           ess=float(st["ess"]), log_ratio_m2=float(st["log_ratio_m2"]),
                                           tv=float(st["tv"]), grad_norm=float(gnorm))
                    t_obs += time.perf_counter() - t1
                opt.step()
                opt.zero_grad(set_to_none=True)
                if self.oracle is not None:
                    t1 = time.perf_counter()
                    m = strat.gate.get_metrics()
                    e = self.oracle.end_step()
                    e.update(z_energy=m["statistic"], energy=m["energy"])
                    t_obs += time.perf_counter() - t1
                if strat.after_step(k):
                    stop = True
                    break
            if stop:
                break
        self.counts.passes += passes
        self.counts.steps_attempted += steps
        return passes, steps, t_obs
