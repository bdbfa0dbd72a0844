"""Policy-drift statistics for the gate: what PPO-style losses already know about how far the policy has moved.

:func:`drift_stats` turns the per-token log-probabilities of the current policy and of the rollout policy into the
statistics the gate can watch (``GateConfig.drift``), as 0-d device tensors — no ``.item()``, no host sync — so
they can be handed to :meth:`dgg_fused.GatedOptimizer.record_drift` on every step.
"""

from __future__ import annotations

import torch

from .config import DRIFT_STATS

__all__ = ["drift_stats", "DRIFT_STATS"]


def drift_stats(
    logp_new: torch.Tensor,
    logp_old: torch.Tensor,
    mask: torch.Tensor | None = None,
    *,
    clip_eps: float = 0.2,
) -> dict[str, torch.Tensor]:
    """Drift of the current policy from the rollout policy on one mini-batch, over the tokens of ``mask``.

    Args:
        logp_new: per-token log-probabilities under the current policy (any shape; detached here).
        logp_old: the same tokens' log-probabilities under the rollout (behaviour) policy, same shape.
        mask: which tokens count (bool or 0/1, same shape); None counts every token.
        clip_eps: the PPO clip range used for ``clip_frac``.

    Returns:
        ``{"approx_kl", "clip_frac", "ratio_max"}`` (see :data:`dgg_fused.DRIFT_STATS`), each a 0-d float32 tensor
        on ``logp_new``'s device: ``approx_kl = mean((r - 1) - log r)`` (the k3 estimator of KL(old || new), always
        >= 0; what PPO implementations compare with ``target_kl``), ``clip_frac = mean(|r - 1| > clip_eps)``,
        ``ratio_max = max |log r|``, with ``r = exp(logp_new - logp_old)``. With no counted token all three are 0.

    Raises:
        ValueError: shapes differ, or ``clip_eps`` is not a finite number >= 0.
        TypeError: the log-probabilities are not floating point.
    """
    if not isinstance(logp_new, torch.Tensor) or not isinstance(logp_old, torch.Tensor):
        raise TypeError("drift_stats: logp_new and logp_old must be tensors")
    if not (logp_new.is_floating_point() and logp_old.is_floating_point()):
        raise TypeError(f"drift_stats: log-probabilities must be floating point, got {logp_new.dtype}, {logp_old.dtype}")
    if logp_new.shape != logp_old.shape:
        raise ValueError(f"drift_stats: shapes differ: {tuple(logp_new.shape)} vs {tuple(logp_old.shape)}")
    if isinstance(clip_eps, bool) or not isinstance(clip_eps, (int, float)) or not (0 <= float(clip_eps) < float("inf")):
        raise ValueError(f"drift_stats: clip_eps must be a finite number >= 0, got {clip_eps!r}")
    log_r = (logp_new.detach().to(torch.float32) - logp_old.detach().to(device=logp_new.device, dtype=torch.float32))
    if mask is None:
        m = torch.ones_like(log_r, dtype=torch.bool)
    else:
        if mask.shape != log_r.shape:
            raise ValueError(f"drift_stats: mask shape {tuple(mask.shape)} differs from {tuple(log_r.shape)}")
        m = mask.detach().to(device=log_r.device) != 0
    zero = torch.zeros((), dtype=torch.float32, device=log_r.device)
    log_r = torch.where(m, log_r, zero)  # masked-out tokens (padding: -inf log-probs) contribute exactly 0
    r = log_r.exp()
    n = m.sum().to(torch.float32).clamp(min=1.0)
    approx_kl = torch.where(m, (r - 1.0) - log_r, zero).sum() / n
    clip_frac = (m & ((r - 1.0).abs() > clip_eps)).sum().to(torch.float32) / n
    ratio_max = log_r.abs().amax() if log_r.numel() else zero
    return {"approx_kl": approx_kl, "clip_frac": clip_frac, "ratio_max": ratio_max.to(torch.float32)}
