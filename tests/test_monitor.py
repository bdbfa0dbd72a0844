"""DWDMonitor: weight-change numbers, row split, energy and update norms, per reuse index."""

import math

import pytest
import torch
from torch import nn

from dgg_fused.monitor import DWDMonitor, classify_parameters


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed_tokens = nn.Embedding(4, 2)
        self.self_attn = nn.Linear(2, 2, bias=False)
        self.mlp = nn.Linear(2, 2, bias=False)
        self.norm = nn.LayerNorm(2)
        self.lm_head = nn.Linear(2, 4, bias=False)

    def forward(self, x):
        return self.lm_head(self.norm(self.mlp(self.self_attn(self.embed_tokens(x)))))


def _model():
    m = Tiny()
    with torch.no_grad():
        for p in m.parameters():
            p.fill_(1.0)
    return m


def test_classify_parameters():
    m = _model()
    g = classify_parameters(m, m.lm_head.parameters())
    assert [p is m.lm_head.weight for p in g["lm_head"]] == [True]
    assert g["embeddings"] == [m.embed_tokens.weight]
    assert g["attention"] == [m.self_attn.weight]
    assert g["mlp"] == [m.mlp.weight]
    assert set(map(id, g["other"])) == {id(m.norm.weight), id(m.norm.bias)}


def test_weight_change_numbers():
    m = _model()
    mon = DWDMonitor(m, lm_head=m.lm_head, used_rows=[0, 1])
    assert all(v == 0.0 for v in mon.weight_change().values())
    with torch.no_grad():
        m.lm_head.weight[3] += torch.tensor([3.0, 4.0])  # unused row moves by 5
        m.self_attn.weight[0, 0] += 2.0
    wc = mon.weight_change()
    # lm_head: ||dW|| = 5, ||W0|| = sqrt(8); unused rows (2, 3): ||W0|| = 2; used rows unchanged
    assert wc["lm_head"] == pytest.approx(5 / math.sqrt(8))
    assert wc["lm_head/unused"] == pytest.approx(5 / 2)
    assert wc["lm_head/used"] == 0.0
    assert wc["attention"] == pytest.approx(2 / 2)
    assert wc["mlp"] == 0.0 and wc["embeddings"] == 0.0
    # norm bias starts at 1.0 here; a group with zero W0 reports the absolute change
    with torch.no_grad():
        m.norm.bias.zero_()
    mon.reset_reference()
    with torch.no_grad():
        m.norm.bias += 3.0
        m.norm.weight += 0.0
    wc = mon.weight_change()
    assert wc["other"] == pytest.approx(math.sqrt(9 * 2) / math.sqrt(2))
    assert wc["lm_head"] == 0.0


def test_lm_head_required_without_get_output_embeddings():
    m = _model()
    with pytest.raises(ValueError, match="lm_head="):
        DWDMonitor(m, used_rows=[0])
    assert DWDMonitor(m, lm_head=m.lm_head.weight, used_rows=[0, 3]).n_used_rows == 2


def test_energy_update_split_and_ratios():
    m = _model()
    mon = DWDMonitor(m, lm_head=m.lm_head, used_rows=[0])
    opt = torch.optim.SGD(m.parameters(), lr=0.5)
    for k, scale in ((1, 1.0), (2, 2.0), (1, 1.0), (2, 2.0)):
        m.lm_head.weight.grad = torch.zeros(4, 2)
        m.lm_head.weight.grad[0] = torch.tensor([scale, 0.0])  # used row
        m.lm_head.weight.grad[2] = torch.tensor([0.0, 2 * scale])  # unused row
        e = mon.record_gradients(k)
        assert e["energy"] == pytest.approx(5 * scale**2)
        assert e["energy_used"] == pytest.approx(scale**2)
        assert e["energy_unused"] == pytest.approx(4 * scale**2)
        mon.begin_step()
        opt.step()
        s = mon.end_step(k)
        assert s["update"] == pytest.approx(0.5 * math.sqrt(5) * scale)
        assert s["update_used"] == pytest.approx(0.5 * scale)
        assert s["update_unused"] == pytest.approx(scale)
        assert s["skipped"] == 0.0
        opt.zero_grad()
    assert mon.by_reuse_index("energy") == {1: pytest.approx(5.0), 2: pytest.approx(20.0)}
    assert mon.reuse_ratio("energy") == {1: 1.0, 2: pytest.approx(4.0)}
    assert mon.reuse_ratio("update_unused") == {1: 1.0, 2: pytest.approx(2.0)}
    # a step that does not move the weight counts as skipped and is left out of the medians
    m.lm_head.weight.grad = torch.ones(4, 2)
    mon.record_gradients(3)
    mon.begin_step()
    s = mon.end_step(3)
    assert s["skipped"] == 1.0
    assert 3 not in mon.by_reuse_index("energy")
    assert mon.by_reuse_index("energy", include_skipped=True)[3] == pytest.approx(8.0)
    assert len(mon.steps) == 5


def test_monitor_errors():
    m = _model()
    with pytest.raises(ValueError):
        DWDMonitor(m, lm_head=m.lm_head, used_rows=[4])
    mon = DWDMonitor(m, lm_head=m.lm_head)
    with pytest.raises(RuntimeError):
        mon.record_gradients(1)
    with pytest.raises(RuntimeError):
        mon.end_step(1)
    assert "lm_head/used" not in mon.weight_change()
