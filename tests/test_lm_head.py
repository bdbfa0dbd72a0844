"""dgg_fused.lm_head: finding the output projection of a model, and telling whether it is tied."""

from __future__ import annotations

import sys
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


def test_find_lm_head_says_which_candidate_it_rejected_and_why():
    """Regression (issue 17, edge 11): a model whose `head` is not vocabulary-sized was said to have none of the
    candidate attributes."""

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(37, 16)
            self.head = nn.Linear(16, 10)  # a classifier head: 10 rows, not the 37-token vocabulary

        def get_input_embeddings(self):
            return self.embed

    with pytest.raises(ValueError, match=r"it has 'head' \(Linear: its weight \(10, 16\) does not have the input "
                                         r"embedding's 37 rows\), not an output projection"):
        find_lm_head(Net())


@pytest.mark.parametrize("make", [
    lambda: nn.Sequential(nn.Embedding(9, 4), nn.Linear(4, 4), nn.Linear(4, 9)),  # 3 modules with parameters
    lambda: _Tiny(),                                                              # a model with an lm_head child
])
def test_small_whole_models_are_rejected_too(make):
    """Regression (issue 17, edge 12): only more than 3 modules with parameters were refused; a 3-module model
    passed and the gate watched every parameter."""
    model = make()
    opt = torch.optim.AdamW(model.parameters(), fused=True)
    with pytest.raises(ValueError, match="not the whole model"):
        GatedOptimizer(opt, lm_head=model)


class _Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Linear(4, 4)
        self.lm_head = nn.Linear(4, 9)


def test_heads_with_a_bias_a_norm_or_a_wrapper_are_accepted():
    head = nn.Sequential(nn.LayerNorm(4), nn.Linear(4, 9))  # a norm and a projection
    opt = torch.optim.AdamW(head.parameters(), fused=True)
    assert len(GatedOptimizer(opt, lm_head=head).lm_head_params) == 4
    wrapper = nn.Module()
    wrapper.output = nn.Linear(4, 9)  # a wrapper around the projection alone
    opt = torch.optim.AdamW(wrapper.parameters(), fused=True)
    assert len(GatedOptimizer(opt, lm_head=wrapper).lm_head_params) == 2


# ---------------------------------------------------------------- the tied-head warning: one, from every entry point
def _one_liner_steps(model, opt, n=3):
    for k in range(1, n + 1):
        opt.set_reuse_index(k)
        ids = torch.arange(8).reshape(1, 8)
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()


def test_readme_one_liner_warns_once_on_a_tied_head_pointing_at_the_construction():
    """Issue 18, edge 9: GatedOptimizer(..., lm_head=model.lm_head) on a tied model said nothing."""
    model = _llama(tie=True)
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        line = sys._getframe().f_lineno + 1
        opt = GatedOptimizer(torch.optim.AdamW(model.parameters(), fused=True), lm_head=model.lm_head)
        with torch.no_grad():
            model(input_ids=torch.arange(4).reshape(1, 4))  # a forward without autograd decides nothing
        assert not [w for w in rec if w.category is TiedLmHeadWarning]
        _one_liner_steps(model, opt)
        GatedOptimizer(torch.optim.AdamW(model.parameters(), fused=True), lm_head=model.lm_head)  # same weight
        _one_liner_steps(model, opt)
    tied = [w for w in rec if w.category is TiedLmHeadWarning]
    assert len(tied) == 1, [str(w.message) for w in tied]  # once, not per step, not per optimizer
    assert (tied[0].filename, tied[0].lineno) == (__file__, line)
    assert "tied to the input embedding" in str(tied[0].message)


def test_untied_and_accepted_heads_stay_silent():
    with warnings.catch_warnings():
        warnings.simplefilter("error", TiedLmHeadWarning)
        model = _llama(tie=False)
        _one_liner_steps(model, GatedOptimizer(torch.optim.AdamW(model.parameters(), fused=True),
                                               lm_head=model.lm_head))
        model = _llama(tie=True)
        head = find_lm_head(model, warn_tied=False)  # accepted: no entry point warns about this weight again
        _one_liner_steps(model, GatedOptimizer(torch.optim.AdamW(model.parameters(), fused=True), lm_head=head))


def test_find_lm_head_then_the_optimizer_warn_once():
    model = _llama(tie=True)
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        head = find_lm_head(model)
        _one_liner_steps(model, GatedOptimizer(torch.optim.AdamW(model.parameters(), fused=True), lm_head=head))
    tied = [w for w in rec if w.category is TiedLmHeadWarning]
    assert len(tied) == 1 and tied[0].filename == __file__


def test_a_pickled_model_carries_an_inert_probe():
    import copy
    import pickle

    model = _llama(tie=True)
    GatedOptimizer(torch.optim.AdamW(model.parameters(), fused=True), lm_head=model.lm_head)
    clone = pickle.loads(pickle.dumps(model))
    copy.deepcopy(model)
    with warnings.catch_warnings():
        warnings.simplefilter("error", TiedLmHeadWarning)
        clone(input_ids=torch.arange(4).reshape(1, 4)).logits.sum().backward()
