"""GRPO pieces: batched sampling, per-token log-probs, group-normalised advantages and the PPO-clip loss.

These are the textbook definitions (DeepSeekMath's GRPO, as TRL implements it), kept small enough to check by
hand — ``tests/test_grpo.py`` does.

* advantage of sample i in its group: ``A_i = (r_i - mean(r_group)) / (std(r_group) + eps)``, with the unbiased
  standard deviation (``torch.std``, as TRL); a group whose rewards are all equal gets ``A = 0``.
* per-token ratio ``rho_t = exp(logp_t - logp_old_t)`` against the log-probs recorded at rollout time;
  per-token objective ``min(rho_t A, clip(rho_t, 1 - eps, 1 + eps) A)``; the loss is minus its mean over each
  completion's tokens, averaged over the completions of the mini-batch (GRPO's sequence-level mean).
* approximate KL between the rollout policy and the current one, the "k3" estimator
  ``mean((rho - 1) - log rho)`` over completion tokens (what PPO implementations compare with ``target_kl``).
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch

__all__ = [
    "Rollouts",
    "encode_prompts",
    "generate",
    "completion_logprobs",
    "group_advantages",
    "ppo_clip_loss",
    "decode_completions",
]


@dataclass
class Rollouts:
    """One rollout batch: ``N = prompts x group`` completions of ``T`` tokens after left-padded prompts of ``P``."""

    prompt_ids: torch.Tensor  # [N, P] long, left padded
    prompt_mask: torch.Tensor  # [N, P] long
    comp_ids: torch.Tensor  # [N, T] long (pad after EOS)
    comp_mask: torch.Tensor  # [N, T] float, 1 on generated tokens up to and including EOS
    old_logp: torch.Tensor  # [N, T] float, log-probs at rollout time
    rewards: torch.Tensor  # [N] float
    advantages: torch.Tensor  # [N] float

    def __len__(self) -> int:
        return self.comp_ids.shape[0]


def encode_prompts(tokenizer, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded ``(input_ids, attention_mask)`` for a list of prompts."""
    enc = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    return enc["input_ids"], enc["attention_mask"]


def _positions(mask: torch.Tensor) -> torch.Tensor:
    return (mask.cumsum(-1) - 1).clamp(min=0)


def _hidden(model, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    out = model.model(input_ids=ids, attention_mask=mask, position_ids=_positions(mask), use_cache=False)
    return out.last_hidden_state


def _forward(model, cache, new_cache: bool = False, **kw):
    """``model.model(**kw)`` continuing ``cache`` (None: none; ``new_cache``: start one) -> ``(last_hidden_state,
    cache)``. The keyword is ``cache`` in transformers 5, ``past_key_values`` before (deprecated in 5.x)."""
    if cache is not None:
        kw["cache" if "cache" in inspect.signature(model.model.forward).parameters else "past_key_values"] = cache
    out = model.model(use_cache=cache is not None or new_cache, **kw)
    return out.last_hidden_state, (out["cache"] if "cache" in out else out.get("past_key_values"))


def _prefixed(model, prefix_ids: torch.Tensor | None, n: int, mask: torch.Tensor):
    """``(cache, attention_mask, position_ids)`` for ``n`` rows that continue ``prefix_ids`` ([1, L] or None) with
    tokens masked by ``mask`` [n, S]: the prefix is run once and its keys and values shared by every row
    (differentiable: the gradient of every row flows into the one prefix computation)."""
    if prefix_ids is None or prefix_ids.shape[1] == 0:
        return None, mask, _positions(mask)
    L = prefix_ids.shape[1]
    _, cache = _forward(model, None, input_ids=prefix_ids, position_ids=torch.arange(L)[None], new_cache=True)
    cache.reorder_cache(torch.zeros(n, dtype=torch.long))  # batch 1 -> n (an index, so autograd sums the rows)
    full = torch.cat([torch.ones(n, L, dtype=mask.dtype), mask], dim=1)
    return cache, full, _positions(full)[:, L:]


@torch.no_grad()
def generate(
    model,
    prompt_ids: torch.Tensor,
    prompt_mask: torch.Tensor,
    max_new_tokens: int,
    eos_id: int,
    pad_id: int,
    *,
    greedy: bool = False,
    temperature: float = 1.0,
    generator: torch.Generator | None = None,
    kv_cache: bool = False,
    prefix_ids: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sample (or greedily decode) up to ``max_new_tokens`` tokens per prompt; stop a row at EOS.

    Returns ``(comp_ids [N, T], comp_mask [N, T] float)``; tokens after a row's EOS are ``pad_id`` with mask 0.
    Only the last position's logits are computed (the lm_head is the big matrix here). One ``multinomial`` draw
    per step over all rows, from ``generator``.

    ``kv_cache=False`` (the toy policy's sampler) re-reads the whole sequence every step. ``kv_cache=True`` reads
    the prompt once, after ``prefix_ids`` ([1, L], a prefix every row shares, read once for all rows), and keeps a
    KV cache: the same draws, logits equal to the re-reading ones up to floating-point rounding (a test).
    """
    if prefix_ids is not None and not kv_cache:
        raise ValueError("generate: a shared prefix_ids needs kv_cache=True")
    n = prompt_ids.shape[0]
    ids, mask = prompt_ids, prompt_mask
    if kv_cache:
        cache, mask, pos = _prefixed(model, prefix_ids, n, prompt_mask)
        h, cache = _forward(model, cache, new_cache=True, input_ids=prompt_ids, attention_mask=mask, position_ids=pos)
        nxt_pos = pos[:, -1:] + 1
    else:
        h = _hidden(model, ids, mask)
    h = h[:, -1]
    toks, live_cols = [], []
    alive = torch.ones(n, dtype=torch.bool)
    for step in range(max_new_tokens):
        logits = model.lm_head(h).float()
        if greedy:
            nxt = logits.argmax(-1)
        else:
            probs = torch.softmax(logits / temperature, dim=-1)
            nxt = torch.multinomial(probs, 1, generator=generator).squeeze(-1)
        nxt = torch.where(alive, nxt, torch.full_like(nxt, pad_id))
        toks.append(nxt)
        live_cols.append(alive.clone())
        mask = torch.cat([mask, alive.long()[:, None]], dim=1)
        alive = alive & (nxt != eos_id)
        if step + 1 == max_new_tokens or not bool(alive.any()):
            break
        if kv_cache:
            h, cache = _forward(model, cache, input_ids=nxt[:, None], attention_mask=mask, position_ids=nxt_pos)
            nxt_pos = nxt_pos + 1
        else:
            ids = torch.cat([ids, nxt[:, None]], dim=1)
            h = _hidden(model, ids, mask)
        h = h[:, -1]
    comp = torch.stack(toks, dim=1)
    cmask = torch.stack(live_cols, dim=1).float()
    if comp.shape[1] < max_new_tokens:  # pad to the fixed width T so batches stack
        extra = max_new_tokens - comp.shape[1]
        comp = torch.cat([comp, torch.full((n, extra), pad_id, dtype=comp.dtype)], dim=1)
        cmask = torch.cat([cmask, torch.zeros(n, extra)], dim=1)
    return comp, cmask


def completion_logprobs(
    model,
    prompt_ids: torch.Tensor,
    prompt_mask: torch.Tensor,
    comp_ids: torch.Tensor,
    comp_mask: torch.Tensor,
    *,
    prefix_ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per-token log-probs ``[N, T]`` of ``comp_ids`` under ``model`` (differentiable); 0 where masked.

    ``prefix_ids`` ([1, L]): a prefix every row continues (a few-shot template), run once for the batch, its keys
    and values shared by every row, forward and backward (equal to prepending it to every row, up to rounding: a
    test). Without it the rows are read as they are.
    """
    p, t = prompt_ids.shape[1], comp_ids.shape[1]
    ids = torch.cat([prompt_ids, comp_ids], dim=1)
    cache, mask, pos = _prefixed(model, prefix_ids, ids.shape[0], torch.cat([prompt_mask, comp_mask.long()], dim=1))
    h, _ = _forward(model, cache, input_ids=ids, attention_mask=mask, position_ids=pos)
    h = h[:, p - 1 : p + t - 1]
    logp = torch.log_softmax(model.lm_head(h).float(), dim=-1)
    return logp.gather(-1, comp_ids[..., None]).squeeze(-1) * comp_mask


def decode_completions(tokenizer, comp_ids: torch.Tensor, comp_mask: torch.Tensor, eos_id: int) -> list[str]:
    """Completions as space-separated words, without the EOS (what a task's ``verify`` receives)."""
    out = []
    for row, m in zip(comp_ids.tolist(), comp_mask.tolist()):
        words = []
        for tok, keep in zip(row, m):
            if not keep or tok == eos_id:
                break
            words.append(tok)
        out.append(" ".join(tokenizer.convert_ids_to_tokens(words)))
    return out


def group_advantages(rewards: torch.Tensor, group_size: int, eps: float = 1e-4) -> torch.Tensor:
    """GRPO advantages: rewards normalised within consecutive groups of ``group_size`` (unbiased std)."""
    if rewards.numel() % group_size:
        raise ValueError(f"{rewards.numel()} rewards do not split into groups of {group_size}")
    r = rewards.float().view(-1, group_size)
    mean = r.mean(dim=1, keepdim=True)
    std = r.std(dim=1, keepdim=True) if group_size > 1 else torch.zeros_like(mean)
    return ((r - mean) / (std + eps)).view(-1)


def ppo_clip_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_eps: float = 0.2,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """GRPO's clipped surrogate loss for one mini-batch, plus diagnostics (detached).

    Args:
        logp, old_logp: ``[B, T]`` per-token log-probs now and at rollout time.
        advantages: ``[B]``.
        mask: ``[B, T]`` float, 1 on completion tokens.

    Returns:
        ``(loss, {"approx_kl", "clipfrac", "ratio_mean", "ratio_max", "ess", "log_ratio_m2", "tv"})``;
        ``ratio_max`` is the largest ``|log rho|`` over the masked tokens (0 for an empty mask); over the ``n``
        masked tokens, ``ess = (sum rho)^2 / (n sum rho^2)`` is the normalised effective sample size of the token
        importance weights (VCPO; 1 on policy, falls with drift), ``log_ratio_m2 = mean (log rho)^2`` (M2PO's
        second moment) and ``tv = mean |rho - 1| / 2`` (the total-variation estimate of DPPO's trust region).
    """
    log_ratio = logp - old_logp
    ratio = torch.exp(log_ratio)
    adv = advantages[:, None]
    s1 = ratio * adv
    s2 = ratio.clamp(1.0 - clip_eps, 1.0 + clip_eps) * adv
    tok = -torch.minimum(s1, s2)
    ntok = mask.sum(dim=1).clamp(min=1.0)
    loss = ((tok * mask).sum(dim=1) / ntok).mean()
    with torch.no_grad():
        denom = mask.sum().clamp(min=1.0)
        lr_ = log_ratio.detach()
        r_ = ratio.detach()
        stats = {
            "approx_kl": (((r_ - 1.0) - lr_) * mask).sum() / denom,
            "clipfrac": (((r_ - 1.0).abs() > clip_eps).float() * mask).sum() / denom,
            "ratio_mean": (r_ * mask).sum() / denom,
            "ratio_max": (lr_.abs() * mask).amax() if mask.numel() else torch.zeros(()),
            "ess": (r_ * mask).sum() ** 2 / (denom * (r_ * r_ * mask).sum()).clamp(min=torch.finfo(r_.dtype).tiny),
            "log_ratio_m2": (lr_ * lr_ * mask).sum() / denom,
            "tv": 0.5 * ((r_ - 1.0).abs() * mask).sum() / denom,
        }
    return loss, stats
