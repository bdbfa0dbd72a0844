"""Policy-drift statistics for the gate: what PPO-style losses already know about how far the policy has moved.

:func:`drift_stats` turns the per-token log-probabilities of the current policy and of the rollout policy into the
statistics the gate can watch (``GateConfig.drift``), as 0-d device tensors — no ``.item()``, no host sync — so
they can be handed to :meth:`dgg_fused.GatedOptimizer.record_drift` on every step.
"""

from __future__ import annotations

import torch

from .config import DRIFT_STATS

__all__ = ["drift_stats", "DRIFT_STATS", "drift_partials", "ess_from_sums"]


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
        One 0-d float32 tensor on ``logp_new``'s device per name of :data:`dgg_fused.DRIFT_STATS`. Over the ``n``
        counted tokens, with ``l = logp_new - logp_old`` and the importance ratio (weight) ``r = w = exp(l)``:

        * ``approx_kl = mean((r - 1) - l)``: the k3 estimator of KL(old || new), always >= 0; what PPO
          implementations compare with ``target_kl``;
        * ``clip_frac = mean(|r - 1| > clip_eps)``;
        * ``ratio_max = max |l|``;
        * ``ess = (sum w)^2 / (n sum w^2)``: the normalised effective sample size of the token importance weights
          (VCPO), in (0, 1], 1 on policy, falling with drift. Computed with the largest ``l`` subtracted first
          (``w_i = exp(l_i - max l)``; the ratio is unchanged), so log ratios far beyond float32's ``exp`` range
          (e.g. +-80, +-1000) give the right value; clamped at 1 (the float32 rounding of a value that is <= 1);
        * ``log_ratio_m2 = mean(l^2)``: the second moment of the log ratio (M2PO);
        * ``tv = mean(|r - 1|) / 2``: the total-variation estimate of DPPO's trust region (``r - 1`` as
          ``expm1(l)``, exact near r = 1).

        The log-probabilities are rounded to float32 first and everything is computed in float32 (sums as torch's
        ``sum``). With no counted token (an empty tensor or mask) nothing has drifted: ``ess = 1`` and every other
        statistic is 0. A non-finite counted log ratio makes the statistics it enters non-finite (a gate trips on
        a non-finite value); masked-out tokens (padding, -inf log-probabilities) contribute nothing.

    Raises:
        ValueError: shapes differ, or ``clip_eps`` is not a finite number >= 0.
        TypeError: the log-probabilities are not floating point.
    """
    return drift_partials(logp_new, logp_old, mask, clip_eps)[0]


def drift_partials(
    logp_new: torch.Tensor, logp_old: torch.Tensor, mask: torch.Tensor | None, clip_eps: float
) -> tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`drift_stats` (arguments checked as there) and the parts its ``ess`` is made of, for a caller that
    combines several mini-batches (:class:`dgg_fused.integrations.DriftAccumulator`): ``(stats, count, top, s1,
    s2)``. ``count``: the number of counted tokens (float32, 0 without one); ``top``: the largest counted log ratio
    (``-inf`` without one); ``s1``, ``s2``: ``sum w`` and ``sum w^2`` with ``w = exp(l - top)`` (``top`` taken as 0
    when it is ``-inf``). Parts combine after scaling ``s1`` by ``exp(top_part - top_both)`` and ``s2`` by its
    square; :func:`ess_from_sums` turns the combined sums into the ESS."""
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
    count = m.sum().to(torch.float32)
    n = count.clamp(min=1.0)
    approx_kl = torch.where(m, (r - 1.0) - log_r, zero).sum() / n
    clip_frac = (m & ((r - 1.0).abs() > clip_eps)).sum().to(torch.float32) / n
    ratio_max = log_r.abs().amax() if log_r.numel() else zero
    log_ratio_m2 = log_r.square().sum() / n
    tv = 0.5 * torch.where(m, log_r.expm1().abs(), zero).sum() / n  # expm1: no cancellation in r - 1 near r = 1
    top, s1, s2 = _ess_sums(log_r, m)
    stats = {"approx_kl": approx_kl, "clip_frac": clip_frac, "ratio_max": ratio_max.to(torch.float32),
             "ess": ess_from_sums(s1, s2, count), "log_ratio_m2": log_ratio_m2, "tv": tv}
    return stats, count, top, s1, s2


def _ess_sums(log_r: torch.Tensor, m: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(top, s1, s2)``: the largest counted log ratio (``-inf`` without a counted token) and ``sum w``, ``sum w^2``
    over the counted tokens ``m`` with ``w = exp(log_r - top)`` (``top`` taken as 0 when it is ``-inf``). Every
    weight is then <= 1 and the largest is 1, so neither sum overflows; the ESS is invariant to that common factor,
    and sums of two parts combine after scaling each by ``exp(top_part - top_both)`` (``**2`` for ``s2``)."""
    neg_inf = torch.full((), float("-inf"), dtype=log_r.dtype, device=log_r.device)
    top = torch.where(m, log_r, neg_inf).amax() if log_r.numel() else neg_inf
    shift = torch.where(top == float("-inf"), torch.zeros_like(top), top)  # no counted token (or all -inf): none
    w = torch.where(m, (log_r - shift).exp(), torch.zeros_like(log_r))
    return top, w.sum(), w.square().sum()


def ess_from_sums(s1: torch.Tensor, s2: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
    """``(sum w)^2 / (n sum w^2)`` from :func:`_ess_sums`' ``s1``, ``s2`` and the token count ``n``, clamped at 1
    (``n sum w^2 >= 1`` when the largest weight is 1); 1 without a counted token."""
    ess = (s1 * s1 / (count * s2)).clamp(max=1.0)
    return torch.where(count > 0, ess, torch.ones_like(ess))
