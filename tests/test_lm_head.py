"""dgg_fused.lm_head: finding the output projection of a model, and telling whether it is tied."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from dgg_fused import GateConfig, GatedOptimizer, TiedLmHeadWarning, find_lm_head, is_tied


def _llama(tie: bool):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                   num_attention_heads=2, num_key_value_heads=2, tie_word_embeddings=tie)
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(cfg)


def test_find_lm_head_hf_untied():
    model = _llama(tie=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        head = find_lm_head(model)
    assert head is model.lm_head and not is_tied(model, head)


def test_find_lm_head_hf_tied_warns():
    model = _llama(tie=True)
    with pytest.warns(TiedLmHeadWarning, match="tied"):
        head = find_lm_head(model)
    assert is_tied(model, head)
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


def test_find_lm_head_skips_an_output_module_that_is_no_projection():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(11, 4)
            self.output = nn.LayerNorm(4)  # named "output", has a weight, but projects nothing
            self.head = nn.Linear(4, 11)

        def get_input_embeddings(self):
            return self.embed

    net = Net()
    assert find_lm_head(net) is net.head
    only_norm = nn.Module()
    only_norm.output = nn.LayerNorm(4)
    with pytest.raises(ValueError, match="pass lm_head= explicitly"):
        find_lm_head(only_norm)


def test_whole_model_as_lm_head_is_rejected():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(9, 4), nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 4), nn.Linear(4, 9))
    opt = torch.optim.AdamW(model.parameters(), fused=True)
    with pytest.raises(ValueError, match="not the whole model"):
        GatedOptimizer(opt, lm_head=model, config=GateConfig())
    GatedOptimizer(opt, lm_head=model[-1])  # the projection itself is fine
