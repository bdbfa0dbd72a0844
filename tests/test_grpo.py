"""GRPO advantage and PPO-clip loss against hand-computed cases."""

import math

import pytest
import torch

from dgg_fused.demo.grpo import group_advantages, ppo_clip_loss


def test_group_advantages_hand_case():
    r = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0, 1.0])
    a = group_advantages(r, 4, eps=0.0)
    s = math.sqrt(1 / 3)  # unbiased std of [1, 0, 0, 1]
    want = torch.tensor([0.5 / s, -0.5 / s, -0.5 / s, 0.5 / s, 0, 0, 0, 0])
    torch.testing.assert_close(a[:4], want[:4])
    # an all-equal group has zero advantage (eps keeps it finite)
    a = group_advantages(r, 4)
    assert torch.equal(a[4:], torch.zeros(4))
    with pytest.raises(ValueError):
        group_advantages(r, 3)


def test_group_advantages_groups_are_independent():
    r = torch.tensor([0.0, 1.0, 3.0, 5.0])
    a = group_advantages(r, 2, eps=0.0)
    s = math.sqrt(0.5)
    torch.testing.assert_close(a, torch.tensor([-0.5 / s, 0.5 / s, -1 / math.sqrt(2), 1 / math.sqrt(2)]))


def test_ppo_clip_loss_hand_cases():
    # four one-token completions: ratio 1.5 or 0.5, advantage +1 or -1, clip eps 0.2
    old = torch.zeros(4, 1)
    logp = torch.log(torch.tensor([[1.5], [0.5], [1.5], [0.5]]))
    adv = torch.tensor([1.0, 1.0, -1.0, -1.0])
    mask = torch.ones(4, 1)
    loss, st = ppo_clip_loss(logp, old, adv, mask, clip_eps=0.2)
    # per-token objective min(r A, clip(r) A): 1.2, 0.5, -1.5, -0.8  -> loss = -mean
    torch.testing.assert_close(loss, torch.tensor(-(1.2 + 0.5 - 1.5 - 0.8) / 4))
    k3 = [(r - 1) - math.log(r) for r in (1.5, 0.5, 1.5, 0.5)]
    torch.testing.assert_close(st["approx_kl"], torch.tensor(sum(k3) / 4))
    torch.testing.assert_close(st["clipfrac"], torch.tensor(1.0))


def test_ppo_clip_loss_sequence_mean_and_mask():
    # sequence 0: two tokens at ratio 1 (A=2); sequence 1: one real token at ratio 1 (A=-1) and a masked one
    old = torch.zeros(2, 2)
    logp = torch.tensor([[0.0, 0.0], [0.0, 5.0]])  # the masked token's huge ratio must not matter
    adv = torch.tensor([2.0, -1.0])
    mask = torch.tensor([[1.0, 1.0], [1.0, 0.0]])
    loss, st = ppo_clip_loss(logp * mask, old, adv, mask)
    torch.testing.assert_close(loss, torch.tensor(-(2.0 + -1.0) / 2))
    torch.testing.assert_close(st["approx_kl"], torch.tensor(0.0))


def test_ppo_clip_loss_gradient_zero_when_clipped():
    old = torch.zeros(2, 1)
    logp = torch.log(torch.tensor([[1.5], [0.9]])).requires_grad_()
    adv = torch.tensor([1.0, 1.0])
    loss, _ = ppo_clip_loss(logp, old, adv, torch.ones(2, 1), clip_eps=0.2)
    loss.backward()
    # clipped token (ratio 1.5 > 1.2 with A > 0): no gradient; the other: d(-r A / 2)/dlogp = -r A / 2
    torch.testing.assert_close(logp.grad, torch.tensor([[0.0], [-0.45]]))


def test_ppo_clip_loss_ratio_max_ignores_masked_tokens():
    old = torch.zeros(2, 2)
    logp = torch.tensor([[0.3, -0.5], [0.1, 9.0]])
    mask = torch.tensor([[1.0, 1.0], [1.0, 0.0]])
    _, st = ppo_clip_loss(logp, old, torch.tensor([1.0, -1.0]), mask)
    torch.testing.assert_close(st["ratio_max"], torch.tensor(0.5))


@pytest.mark.parametrize("shape", [(1, 1), (3, 5), (8, 13)])
def test_ppo_clip_loss_drift_signals_match_a_float64_reference(shape):
    """ess, log_ratio_m2 and tv over the masked tokens, against a straight float64 transcription of their
    definitions (masked-out tokens, whatever their log-probs, do not count)."""
    g = torch.Generator().manual_seed(sum(shape))
    logp = torch.randn(shape, generator=g) * 0.3 - 2.0
    old = logp + torch.randn(shape, generator=g) * 0.2
    mask = (torch.rand(shape, generator=g) < 0.7).float()
    mask.view(-1)[0] = 1.0
    logp = torch.where(mask > 0, logp, torch.full_like(logp, -50.0))  # garbage where masked out
    _, st = ppo_clip_loss(logp, old, torch.ones(shape[0]), mask)
    lr = [float(a) - float(b) for a, b, m in zip(logp.flatten(), old.flatten(), mask.flatten()) if m > 0]
    w = [math.exp(x) for x in lr]
    n = len(w)
    ref = {"ess": sum(w) ** 2 / (n * sum(x * x for x in w)), "log_ratio_m2": sum(x * x for x in lr) / n,
           "tv": 0.5 * sum(abs(x - 1.0) for x in w) / n}
    for k, v in ref.items():
        assert float(st[k]) == pytest.approx(v, rel=1e-5, abs=1e-7), k
    assert 0.0 < float(st["ess"]) <= 1.0 + 1e-6


def test_ppo_clip_loss_ess_is_one_on_policy():
    logp = torch.randn(4, 6)
    _, st = ppo_clip_loss(logp, logp.clone(), torch.ones(4), torch.ones(4, 6))
    assert float(st["ess"]) == pytest.approx(1.0, abs=1e-6)
    assert float(st["log_ratio_m2"]) == 0.0 and float(st["tv"]) == 0.0
