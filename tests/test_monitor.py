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
    assert set(map(id, g["norms"])) == {id(m.norm.weight), id(m.norm.bias)}
    assert "other" not in g


def test_llama_groups_and_a_tied_lm_head_counted_once():
    """A Llama's parameters by group: the norms (also ``post_attention_layernorm``, whose name says attention) are
    their own group; a tied lm_head is the embedding matrix, counted once as lm_head, and the monitor says so."""
    transformers = pytest.importorskip("transformers")
    for tie in (False, True):
        cfg = transformers.LlamaConfig(vocab_size=32, hidden_size=8, intermediate_size=16, num_hidden_layers=2,
                                       num_attention_heads=2, num_key_value_heads=2, tie_word_embeddings=tie)
        model = transformers.LlamaForCausalLM(cfg)
        g = classify_parameters(model, model.lm_head.parameters())
        names = {id(p): n for n, p in model.named_parameters()}
        by = {k: sorted(names[id(p)] for p in ps) for k, ps in g.items()}
        assert by["norms"] == sorted([f"model.layers.{i}.{n}.weight" for i in range(2)
                                      for n in ("input_layernorm", "post_attention_layernorm")] + ["model.norm.weight"])
        assert all(n.split(".")[3] == "self_attn" for n in by["attention"]) and len(by["attention"]) == 8
        assert all(n.split(".")[3] == "mlp" for n in by["mlp"]) and len(by["mlp"]) == 6
        assert "other" not in by
        assert sum(len(ps) for ps in g.values()) == len(list(model.parameters()))  # every parameter, once
        mon = DWDMonitor(model, lm_head=model.lm_head)
        assert mon.tied is tie and DWDMonitor(model, lm_head=model.lm_head.weight).tied is tie
        if tie:
            assert by["lm_head"] == ["model.embed_tokens.weight"] and "embeddings" not in by
        else:
            assert by["lm_head"] == ["lm_head.weight"] and by["embeddings"] == ["model.embed_tokens.weight"]


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
    assert wc["norms"] == pytest.approx(math.sqrt(9 * 2) / math.sqrt(2))
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


# ------------------------------------------------------------------------------------------ harm oracle
from dgg_fused.monitor import HarmOracle, TripEffect, auc, signal_auc, trip_effect, trip_steps  # noqa: E402


def test_auc_hand_cases():
    assert auc([1, 2, 3, 4], [False, False, True, True]) == 1.0
    assert auc([1, 2, 3, 4], [True, True, False, False]) == 0.0
    assert auc([5, 5, 5, 5], [True, False, True, False]) == 0.5
    # positives {3, 1}, negatives {2, 0}: pairs (3>2, 3>0, 1<2, 1>0) -> 3/4
    assert auc([3, 2, 1, 0], [True, False, True, False]) == 0.75
    # a tie between a positive and a negative counts one half: pos {2}, neg {2, 1} -> (0.5 + 1) / 2
    assert auc([2, 2, 1], [True, False, False]) == 0.75
    assert math.isnan(auc([1, 2], [True, True]))
    assert math.isnan(auc([float("nan"), 2], [True, False]))
    with pytest.raises(ValueError):
        auc([1], [True, False])


def _steps():
    # batch 1: k=1 (ignored by AUC / never trips), k=2 harmful with high s, k=2 helpful low s; batch 2 likewise
    return [
        {"batch": 1, "reuse_index": 1, "delta": -0.5, "s": 9.0},
        {"batch": 1, "reuse_index": 2, "delta": -0.1, "s": 3.0},
        {"batch": 1, "reuse_index": 2, "delta": +0.2, "s": 1.0},
        {"batch": 2, "reuse_index": 1, "delta": +0.3, "s": 0.0},
        {"batch": 2, "reuse_index": 2, "delta": +0.1, "s": 2.0},
        {"batch": 2, "reuse_index": 3, "delta": -0.2, "s": 0.5},
    ]


def test_signal_auc_counts_reuse_steps_only():
    # reuse steps: harmful s = {3.0, 0.5}, harmless s = {1.0, 2.0}: pairs 3>1, 3>2, 0.5<1, 0.5<2 -> 0.5
    assert signal_auc(_steps(), "s") == 0.5
    # by reuse index: harmful k = {2, 3}, harmless k = {2, 2}: pairs tie, tie, 3>2, 3>2 -> 3/4
    assert signal_auc(_steps(), "reuse_index") == 0.75


def test_trip_effect_hand_case():
    # s > 2.5: batch 1 trips at its first reuse step (removes it and the next: -0.1 + 0.2); batch 2 never trips
    e = trip_effect(_steps(), "s", 2.5)
    assert trip_steps(_steps(), "s", 2.5) == [1]
    mean_reuse = (-0.1 + 0.2 + 0.1 - 0.2) / 4
    assert e == TripEffect(trips=1, removed_steps=2, removed_delta=pytest.approx(0.1), random_delta=pytest.approx(2 * mean_reuse))
    # s > 0.4: both batches trip at their first reuse step; first-pass steps never trip
    e = trip_effect(_steps(), "s", 0.4)
    assert trip_steps(_steps(), "s", 0.4) == [1, 4]  # one trip per batch: the first crossing on a reuse step
    assert (e.trips, e.removed_steps) == (2, 4) and e.removed_delta == pytest.approx(0.0)
    assert trip_effect(_steps(), "s", 100.0).removed_steps == 0


def test_trip_effect_ids_repeating_across_epochs():
    """Regression (issue 17, edge 10): batches were keyed by id only, so when the same ids came back in a later
    epoch their first-pass steps counted as removed (3 instead of 1 here)."""
    epoch = [{"batch": 0, "reuse_index": 1, "delta": 0.1, "s": 0.0},
             {"batch": 0, "reuse_index": 2, "delta": -0.3, "s": 9.0}]  # trips
    again = [{"batch": 0, "reuse_index": 1, "delta": 0.2, "s": 0.0},   # the same id, a new epoch: not removed
             {"batch": 0, "reuse_index": 1, "delta": 0.2, "s": 0.0}]
    e = trip_effect(epoch + again, "s", 1.0)
    assert (e.trips, e.removed_steps) == (1, 1) and e.removed_delta == pytest.approx(-0.3)


def test_harm_oracle_records_changes_and_signals():
    w = {"v": 0.0}
    calls = []

    def evaluate():
        calls.append(w["v"])
        return w["v"]

    oracle = HarmOracle(evaluate)
    for batch, k, new, sig in ((1, 1, 0.5, 0.1), (1, 2, 0.4, 0.9), (2, 1, 0.7, 0.2)):
        oracle.begin_step(batch=batch, reuse_index=k, s=sig)
        w["v"] = new
        oracle.end_step()["late"] = 1.0
    assert [round(s["delta"], 12) for s in oracle.steps] == [0.5, -0.1, 0.3]
    assert [s["before"] for s in oracle.steps] == [0.0, 0.5, 0.4]
    assert len(calls) == 4  # once before the first step, then once per step
    assert oracle.steps[1]["s"] == 0.9 and oracle.steps[1]["late"] == 1.0
    assert math.isnan(oracle.auc("s"))  # one reuse step: no negatives
    assert oracle.trip_effect("s", 0.5).removed_delta == pytest.approx(-0.1)
    with pytest.raises(RuntimeError):
        oracle.end_step()
    oracle.begin_step(batch=3, reuse_index=1)
    with pytest.raises(RuntimeError):
        oracle.begin_step(batch=3, reuse_index=1)
