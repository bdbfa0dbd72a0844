"""The exact expected reward against brute-force sampling through the real rollout path."""

import random

import torch

from dgg_fused.demo.evaluate import HeldOut
from dgg_fused.demo.grpo import decode_completions, encode_prompts, generate
from dgg_fused.demo.model import ModelConfig, build_model, build_tokenizer
from dgg_fused.demo.policy import WordCodec
from dgg_fused.demo.tasks import AdditionTask, Example, ReversalTask
from dgg_fused.demo.warmstart import WarmStartConfig, warm_start


def _codec(tok):
    return WordCodec(tok, tok.eos_token_id, tok.pad_token_id)


def test_expected_reward_matches_brute_force_sampling():
    task = ReversalTask(length=2, alphabet=3)
    mcfg = ModelConfig(vocab_size=64, hidden_size=16, intermediate_size=32)
    tok = build_tokenizer(task.words, mcfg.vocab_size)
    state, _ = warm_start(task, tok, mcfg, WarmStartConfig(steps=200, batch=32, lr=3e-3), 0, None)
    model = build_model(mcfg, tok, 0)
    model.load_state_dict(state)
    model.eval()
    exs = task.make_prompts(random.Random(5), 4)
    held = HeldOut.build(task, _codec(tok), exs)
    assert held.exact
    p = held.per_prompt(model)
    assert ((p > 0.05) & (p < 0.95)).all(), p  # a policy that is neither right nor wrong for sure
    n = 4000
    gen = torch.Generator().manual_seed(0)
    for ex, pe in zip(exs, p.tolist()):
        ids, mask = encode_prompts(tok, [ex.prompt] * n)
        c, cm = generate(model, ids, mask, task.max_new_tokens, tok.eos_token_id, tok.pad_token_id, generator=gen)
        hits = sum(task.verify(ex, t) for t in decode_completions(tok, c, cm, tok.eos_token_id)) / n
        sd = (pe * (1 - pe) / n) ** 0.5
        assert abs(hits - pe) < 4.5 * sd, (ex, hits, pe)
    assert held.expected_reward(model) == float(p.mean())


def test_several_accepted_answers_are_summed_and_missing_answers_give_a_lower_bound():
    class TwoWays(AdditionTask):
        """Accepts the sum with or without its leading zero."""

        def verify(self, example, completion):
            want = self.answers(example)
            return float(completion in want)

        def answers(self, example):
            a = super().answers(example)[0]
            return [a, a[2:]] if a.startswith("0 ") else [a]

    task = TwoWays(digits=1)
    tok = build_tokenizer(task.words, 32)
    model = build_model(ModelConfig(vocab_size=32, hidden_size=16, intermediate_size=32), tok, 0).eval()
    ex = Example("3 + 4 =", "0 7")
    both = HeldOut.build(task, _codec(tok), [ex]).per_prompt(model)
    one = HeldOut.build(AdditionTask(digits=1), _codec(tok), [ex]).per_prompt(model)
    assert both.item() > one.item() > 0

    class NoList(AdditionTask):
        answers = None

    held = HeldOut.build(NoList(digits=1), _codec(tok), [ex])
    assert not held.exact
    torch.testing.assert_close(held.per_prompt(model), one)
