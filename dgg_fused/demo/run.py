"""The RLVR reuse testbed: GRPO arms on identical seeds, with the DWD monitor and the gate's own metrics.

Arms (``ArmSpec``; the command line takes them as strings, see :func:`parse_arm`):

* ``k1``     single use: every rollout batch is used for one pass (K = 1);
* ``k2``     fixed reuse, K = 2;
* ``naive``  naive reuse, K = ``--K`` (4) passes, no stopping rule;
* ``kl``     KL early stop: up to K passes; on a reuse pass (k > 1), as soon as a mini-batch's approximate KL to
  the rollout policy exceeds ``target_kl`` that step is not taken and reuse of the batch ends (the rule of
  PPO implementations such as Stable-Baselines3, applied to reuse passes);
* ``dgg``    DGG: up to K passes with :class:`dgg_fused.GatedOptimizer`, written exactly as a user would
  (``for k in opt.passes(): ... opt.step(); if opt.reuse_stopped: break``);
* ``dggu``   an experiment beyond the paper: the same gate rule (:func:`dgg_fused.gate.gate_step_`, same
  ``GateConfig``), but fed the squared norm of the lm_head update AdamW *would* apply to the rows of tokens the
  task never uses (computed from the optimizer state before the step, i.e. after preconditioning) instead of the
  gradient energy. It targets Adam-amplified drift of rarely used rows. The skip is decided on the host (a
  demo-side prototype, not a library feature).

Every arm gets the same number of rollout batches, the same prompts and the same sampling seeds, the same
optimizer (fused AdamW) and schedule; each pass over a batch is split into ``minibatches`` optimizer steps.
``wall`` counts rollout generation and updates only (evaluation and monitoring are excluded).
"""

from __future__ import annotations

import math
import random
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

import torch

from ..config import GateConfig
from ..monitor import DWDMonitor
from ..optimizer import GatedOptimizer
from .grpo import (
    Rollouts,
    completion_logprobs,
    decode_completions,
    encode_prompts,
    generate,
    group_advantages,
    ppo_clip_loss,
)
from .model import ModelConfig, build_model, build_tokenizer, task_token_ids
from .tasks import Example, Task
from .warmstart import WarmStartConfig

__all__ = ["DemoConfig", "ArmSpec", "parse_arm", "run_arm", "prepare_task", "BASE_ARMS"]

#: The arms of the default run, in display order.
BASE_ARMS = ("k1", "naive", "k2", "kl", "dgg")


@dataclass(frozen=True)
class DemoConfig:
    """Every knob of one demo run (the command line maps onto these)."""

    iters: int = 30  # rollout batches per arm
    prompts: int = 8  # prompts per rollout batch
    group: int = 8  # G samples per prompt
    minibatches: int = 4  # optimizer steps per pass
    lr: float = 3e-4
    warmup_iters: int = 5  # linear LR warm-up over the first rollout batches
    clip_eps: float = 0.2
    max_grad_norm: float = 1.0
    K: int = 4  # max passes for naive / kl / dgg
    target_kl: float = 0.02
    window: int = GateConfig.window
    tau: float = GateConfig.tau
    statistic: str = GateConfig.statistic
    reference: str = GateConfig.reference
    eval_every: int = 5
    n_eval: int = 128
    smooth: int = 5  # trailing moving average (rollout batches) for rollouts-to-target
    model: ModelConfig = field(default_factory=ModelConfig)
    warm: WarmStartConfig = field(default_factory=WarmStartConfig)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class ArmSpec:
    """One arm: ``kind`` is ``"fixed"``, ``"kl"`` or ``"dgg"``."""

    name: str
    kind: str
    max_reuse: int
    target_kl: float = 0.0
    gate: GateConfig | None = None

    def describe(self) -> str:
        if self.kind == "fixed":
            return f"fixed K={self.max_reuse}"
        if self.kind == "kl":
            return f"KL early stop, K={self.max_reuse}, target_kl={self.target_kl}"
        g = self.gate
        what = "DGG" if self.kind == "dgg" else "update-norm gate (unused lm_head rows, after AdamW preconditioning)"
        return (f"{what} K={self.max_reuse} window={g.window} tau={g.tau} statistic={g.statistic} "
                f"reference={g.reference}")


def parse_arm(spec: str, cfg: DemoConfig) -> ArmSpec:
    """``"k1" | "k2" | "naive" | "kl" | "dgg"``, optionally with overrides after a colon, e.g.
    ``"dgg:tau=1,window=16,statistic=increment,reference=accepted"``, ``"kl:target_kl=0.05"``,
    ``"naive:K=3"``. The arm's name is the spec string itself."""
    base, _, opts = spec.partition(":")
    kw: dict[str, str] = {}
    if opts:
        for item in opts.split(","):
            k, eq, v = item.partition("=")
            if not eq:
                raise ValueError(f"arm {spec!r}: option {item!r} is not key=value")
            kw[k.strip()] = v.strip()
    known = {"K", "target_kl", "tau", "window", "statistic", "reference"}
    if set(kw) - known:
        raise ValueError(f"arm {spec!r}: unknown option(s) {sorted(set(kw) - known)}; known: {sorted(known)}")
    K = int(kw.get("K", cfg.K))
    if base == "k1":
        return ArmSpec(spec, "fixed", int(kw.get("K", 1)))
    if base == "k2":
        return ArmSpec(spec, "fixed", int(kw.get("K", 2)))
    if base == "naive":
        return ArmSpec(spec, "fixed", K)
    if base == "kl":
        return ArmSpec(spec, "kl", K, target_kl=float(kw.get("target_kl", cfg.target_kl)))
    if base in ("dgg", "dggu"):  # same gate config; dggu feeds it the unused-row update norm instead
        gate = GateConfig(
            window=int(kw.get("window", cfg.window)),
            tau=float(kw.get("tau", cfg.tau)),
            max_reuse=K,
            statistic=kw.get("statistic", cfg.statistic),
            reference=kw.get("reference", cfg.reference),
        )
        return ArmSpec(spec, base, K, gate=gate)
    raise ValueError(f"unknown arm {spec!r}: use k1, k2, naive, kl, dgg or dggu (optionally with :key=value,...)")


@dataclass
class PreparedTask:
    task: Task
    tokenizer: Any
    used_rows: list[int]
    eval_set: list[Example]


def prepare_task(task: Task, cfg: DemoConfig) -> PreparedTask:
    tok = build_tokenizer(task.words, cfg.model.vocab_size)
    eval_set = task.make_prompts(random.Random(987654321), cfg.n_eval)
    return PreparedTask(task, tok, task_token_ids(tok, task.words), eval_set)


def _rollouts(model, pt: PreparedTask, exs: list[Example], group: int, gen: torch.Generator) -> Rollouts:
    tok, task = pt.tokenizer, pt.task
    prompts = [ex.prompt for ex in exs for _ in range(group)]
    p_ids, p_mask = encode_prompts(tok, prompts)
    c_ids, c_mask = generate(model, p_ids, p_mask, task.max_new_tokens, tok.eos_token_id, tok.pad_token_id,
                             generator=gen)
    texts = decode_completions(tok, c_ids, c_mask, tok.eos_token_id)
    rewards = torch.tensor([task.verify(ex, t) for ex, t in zip((e for e in exs for _ in range(group)), texts)])
    with torch.no_grad():
        old = completion_logprobs(model, p_ids, p_mask, c_ids, c_mask)
    return Rollouts(p_ids, p_mask, c_ids, c_mask, old, rewards, group_advantages(rewards, group))


@torch.no_grad()
def greedy_accuracy(model, pt: PreparedTask) -> float:
    tok = pt.tokenizer
    p_ids, p_mask = encode_prompts(tok, [ex.prompt for ex in pt.eval_set])
    c_ids, c_mask = generate(model, p_ids, p_mask, pt.task.max_new_tokens, tok.eos_token_id, tok.pad_token_id,
                             greedy=True)
    texts = decode_completions(tok, c_ids, c_mask, tok.eos_token_id)
    return sum(pt.task.verify(ex, t) for ex, t in zip(pt.eval_set, texts)) / len(texts)


@torch.no_grad()
def prospective_adamw_update(opt: torch.optim.AdamW, p: torch.Tensor) -> torch.Tensor:
    """The update ``W_new - W`` AdamW (no weight decay, no amsgrad) would apply to ``p`` given its current grad."""
    g = p.grad
    group = next(gr for gr in opt.param_groups if any(q is p for q in gr["params"]))
    b1, b2 = group["betas"]
    st = opt.state.get(p, {})
    m = st.get("exp_avg", torch.zeros_like(p))
    v = st.get("exp_avg_sq", torch.zeros_like(p))
    t = float(st.get("step", 0.0)) + 1.0
    m = b1 * m + (1 - b1) * g
    v = b2 * v + (1 - b2) * g * g
    denom = (v / (1 - b2**t)).sqrt() + group["eps"]
    return -group["lr"] * (m / (1 - b1**t)) / denom


def run_arm(
    pt: PreparedTask,
    arm: ArmSpec,
    cfg: DemoConfig,
    seed: int,
    warm_state: dict[str, torch.Tensor],
    on_iter: Callable[[], None] | None = None,
) -> dict[str, Any]:
    """Train one arm from the warm start for ``cfg.iters`` rollout batches; return its history and summary."""
    task, tok = pt.task, pt.tokenizer
    model = build_model(cfg.model, tok, seed)
    model.load_state_dict(warm_state)
    model.train()
    inner = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=0.0, fused=True)
    opt: torch.optim.Optimizer = inner
    if arm.kind == "dgg":
        opt = GatedOptimizer(inner, lm_head=model.lm_head, config=arm.gate)
    mon = DWDMonitor(model, lm_head=model.lm_head, used_rows=pt.used_rows)
    ugate = None
    if arm.kind == "dggu":
        from ..gate import GateState, gate_step_

        ugate = GateState.create(arm.gate.window, "cpu")
        unused = torch.ones(model.lm_head.weight.shape[0], dtype=torch.bool)
        unused[pt.used_rows] = False
    u_trips = u_gated = 0
    n_roll = cfg.prompts * cfg.group
    mb_size = math.ceil(n_roll / cfg.minibatches)

    history: list[dict[str, Any]] = []
    wall = 0.0
    rollouts = 0
    total_steps = total_passes = kl_stops = 0

    def snapshot(it: int, extra: dict[str, Any]) -> None:
        row = {"iter": it, "rollouts": rollouts, "wall": wall, "steps": total_steps, "passes": total_passes}
        row.update(extra)
        if it % cfg.eval_every == 0 or it == cfg.iters:
            model.eval()
            row["greedy"] = greedy_accuracy(model, pt)
            model.train()
            row["wc"] = mon.weight_change()
        history.append(row)

    snapshot(0, {"reward": float("nan")})
    for it in range(1, cfg.iters + 1):
        t0 = time.perf_counter()
        t_instr = 0.0
        lr_now = cfg.lr * min(1.0, it / max(1, cfg.warmup_iters))
        for g in opt.param_groups:
            g["lr"] = lr_now
        exs = task.make_prompts(random.Random(seed * 1_000_003 + it), cfg.prompts)
        gen = torch.Generator().manual_seed(seed * 1_000_003 + it)
        model.eval()
        ro = _rollouts(model, pt, exs, cfg.group, gen)
        model.train()
        rollouts += len(ro)
        shuffle = torch.Generator().manual_seed(seed * 7_000_003 + it)

        def minibatches():
            perm = torch.randperm(len(ro), generator=shuffle)
            for i in range(0, len(ro), mb_size):
                yield perm[i : i + mb_size]

        def loss_of(idx):
            logp = completion_logprobs(model, ro.prompt_ids[idx], ro.prompt_mask[idx], ro.comp_ids[idx],
                                       ro.comp_mask[idx])
            return ppo_clip_loss(logp, ro.old_logp[idx], ro.advantages[idx], ro.comp_mask[idx], cfg.clip_eps)

        def instrumented_step(k: int) -> bool:
            """Clip, step, monitor; returns False when the update-norm gate (dggu) dropped the step."""
            nonlocal t_instr, u_trips, u_gated
            ti = time.perf_counter()
            mon.record_gradients(k)
            t_instr += time.perf_counter() - ti
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
            if ugate is not None:
                ugate.reuse_index.fill_(k)
                upd = prospective_adamw_update(inner, model.lm_head.weight)
                skip = bool(gate_step_(ugate, upd[unused].square().sum(), arm.gate))
                if skip:
                    u_trips += 1
                    u_gated += 1
                    opt.zero_grad(set_to_none=True)
                    return False
            ti = time.perf_counter()
            mon.begin_step()
            t_instr += time.perf_counter() - ti
            opt.step()
            ti = time.perf_counter()
            skipped = bool(opt.metrics["skipped"]) if isinstance(opt, GatedOptimizer) else False
            mon.end_step(k, skipped=skipped)
            t_instr += time.perf_counter() - ti
            opt.zero_grad(set_to_none=True)
            return True

        passes = steps = 0
        if arm.kind == "dgg":
            # The loop exactly as a user writes it with the library.
            for k in opt.passes():
                passes += 1
                for idx in minibatches():
                    loss, _ = loss_of(idx)
                    loss.backward()
                    opt.record_energy()  # the energy before clipping, like the monitor's
                    instrumented_step(k)
                    steps += 1
                    if opt.reuse_stopped:
                        break
        else:
            stop = False
            for k in range(1, arm.max_reuse + 1):
                passes += 1
                if ugate is not None and k == 1:
                    ugate.stopped.fill_(False)
                for idx in minibatches():
                    loss, st = loss_of(idx)
                    if arm.kind == "kl" and k > 1 and float(st["approx_kl"]) > arm.target_kl:
                        stop = True
                        kl_stops += 1
                        break
                    loss.backward()
                    steps += 1
                    if not instrumented_step(k):  # dggu tripped: reuse of this batch ends
                        stop = True
                        break
                if stop:
                    break
        total_steps += steps
        total_passes += passes
        wall += time.perf_counter() - t0 - t_instr
        snapshot(it, {"reward": float(ro.rewards.mean()), "iter_passes": passes, "iter_steps": steps})
        if on_iter is not None:
            on_iter()

    gm = opt.get_metrics() if isinstance(opt, GatedOptimizer) else {}
    if arm.kind == "dggu":
        gm = {"stopped_batches": u_trips, "gated_steps": u_gated}
    applied = total_steps - (int(gm["gated_steps"]) if gm else 0)
    return {
        "task": task.name,
        "arm": arm.name,
        "arm_description": arm.describe(),
        "seed": seed,
        "history": history,
        "counts": {
            "rollouts": rollouts,
            "rollout_batches": cfg.iters,
            "passes": total_passes,
            "steps_attempted": total_steps,
            "steps_applied": applied,
            "trips": int(gm.get("stopped_batches", 0)) if gm else kl_stops,
            "gated_steps": int(gm.get("gated_steps", 0)) if gm else 0,
        },
        "reuse": {key: {str(k): v for k, v in mon.by_reuse_index(key).items()}
                  for key in ("energy", "energy_unused", "update", "update_used", "update_unused")},
    }
