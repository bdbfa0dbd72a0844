"""GateConfig validation and find_lm_head."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn

from dgg_fused import GateConfig, TiedLmHeadWarning, find_lm_head, is_tied


@pytest.mark.parametrize(
    "field,value",
    [
        ("window", 1), ("window", 0), ("window", 2.5), ("window", True), ("window", 10**6),
        ("tau", 0), ("tau", -0.1), ("tau", float("nan")), ("tau", float("inf")), ("tau", "0.3"), ("tau", True),
        ("max_reuse", 0), ("max_reuse", 1.0),
        ("statistic", "zscore"), ("reference", "first"),
        ("std_floor", -1e-3), ("std_floor", 1.0), ("std_floor", None),
    ],
)
def test_bad_values_name_the_field(field, value):
    with pytest.raises(ValueError, match=rf"GateConfig\.{field}"):
        GateConfig(**{field: value})


def test_defaults_frozen_and_round_trip():
    c = GateConfig()
    assert c.max_reuse == 4 and 0.1 <= c.tau <= 0.5
    with pytest.raises(dataclasses.FrozenInstanceError):
        c.tau = 1.0  # type: ignore[misc]
    c2 = GateConfig(window=5, tau=1, statistic="both", reference="all")
    assert isinstance(c2.tau, float)
    assert GateConfig.from_dict(c2.to_dict()) == c2
    with pytest.raises(ValueError, match="unknown field"):
        GateConfig.from_dict({**c2.to_dict(), "alpha": 1})


def _llama(tie: bool):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                   num_attention_heads=2, num_key_value_heads=2, tie_word_embeddings=tie)
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(cfg)


def test_find_lm_head_hf_untied():
    model = _llama(tie=False)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        head = find_lm_head(model)
    assert head is model.lm_head and not is_tied(model, head)


def test_find_lm_head_hf_tied_warns():
    model = _llama(tie=True)
    with pytest.warns(TiedLmHeadWarning, match="tied"):
        head = find_lm_head(model)
    assert is_tied(model, head)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        find_lm_head(model, warn_tied=False)


def test_find_lm_head_plain_modules():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.output = nn.Linear(4, 8)

    net = Net()
    assert find_lm_head(net) is net.output
    with pytest.raises(ValueError, match="pass lm_head= explicitly"):
        find_lm_head(nn.Sequential(nn.Linear(2, 2)))
    with pytest.raises(TypeError):
        find_lm_head("model")  # type: ignore[arg-type]
