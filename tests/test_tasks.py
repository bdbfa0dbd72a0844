"""The demo's task interface: verifiers recompute the answer from the prompt; prompts are reproducible."""

import itertools
import random

import pytest

from dgg_fused.demo.tasks import (
    AdditionTask,
    Example,
    ProductTask,
    ReversalTask,
    Task,
    accepted_answers,
    check_task,
    load_task,
)


def test_addition_verifier_hand_cases():
    t = AdditionTask(digits=2)
    ex = Example("3 4 + 5 6 =", "0 9 0")
    assert t.verify(ex, "0 9 0") == 1.0
    assert t.verify(ex, "9 0") == 0.0  # missing the leading zero
    assert t.verify(ex, "0 9 1") == 0.0
    assert t.verify(ex, "0 9 0 0") == 0.0
    assert t.verify(ex, "") == 0.0
    assert t.verify(Example("9 9 + 9 9 =", "1 9 8"), "1 9 8") == 1.0
    assert t.verify(Example("0 0 + 0 0 =", "0 0 0"), "0 0 0") == 1.0
    # the verifier trusts the prompt, not the stored target
    assert t.verify(Example("1 0 + 2 0 =", "9 9 9"), "0 3 0") == 1.0


def test_reversal_verifier_hand_cases():
    t = ReversalTask(length=5, alphabet=8)
    ex = Example("c a h b d >", "d b h a c")
    assert t.verify(ex, "d b h a c") == 1.0
    assert t.verify(ex, "c a h b d") == 0.0
    assert t.verify(ex, "d b h a") == 0.0
    assert t.verify(Example("a b >", "x"), "b a") == 1.0


@pytest.mark.parametrize("task", [AdditionTask(), AdditionTask(digits=3), ReversalTask(), ReversalTask(3, 4),
                                  ProductTask(), ProductTask(digits=3)])
def test_prompts_reproducible_targets_verify(task):
    assert isinstance(task, Task)
    check_task(task)
    a = task.make_prompts(random.Random(7), 50)
    b = task.make_prompts(random.Random(7), 50)
    assert a == b and len(a) == 50
    vocab = set(task.words)
    for ex in a:
        assert task.verify(ex, ex.target) == 1.0
        assert set(ex.prompt.split()) <= vocab and set(ex.target.split()) <= set(task.answer_words)
        assert len(ex.target.split()) < task.max_new_tokens  # room for EOS


def test_load_task_builtin_and_module_attr():
    assert load_task("addition").name == "addition2"
    assert load_task("reversal").name == "reversal5"
    assert load_task("dgg_fused.demo.tasks:ReversalTask").name == "reversal5"
    with pytest.raises(ValueError):
        load_task("nope")


def test_check_task_rejects_bad_tasks():
    class Bad:
        name = "bad"
        words = ("a b",)
        answer_words = ("a b",)
        max_new_tokens = 2

        def make_prompts(self, rng, n):
            return []

        def verify(self, example, completion):
            return 0.0

    with pytest.raises(ValueError):
        check_task(Bad())
    with pytest.raises(TypeError):
        check_task(object())


def test_product_verifier_hand_cases():
    t = ProductTask(digits=2)
    ex = Example("4 7 * 6 =", "2 8 2")
    assert t.verify(ex, "2 8 2") == 1.0
    assert t.verify(ex, "8 2") == 0.0
    assert t.verify(ex, "2 8 2 0") == 0.0
    assert t.verify(Example("9 9 * 9 =", "x"), "8 9 1") == 1.0
    assert t.verify(Example("0 5 * 0 =", "x"), "0 0 0") == 1.0
    assert t.answers(ex) == ["2 8 2"]
    assert load_task("product").name == "product2x1"


def _sequences(words, max_len):
    seqs = [[]]
    for n in range(1, max_len + 1):
        seqs += [list(s) for s in itertools.product(words, repeat=n)]
    return seqs


@pytest.mark.parametrize("task", [AdditionTask(digits=1), ReversalTask(2, 3), ProductTask(digits=1)])
def test_verifier_accepts_exactly_the_listed_answers(task):
    """By enumeration on small instances: every completion of task words that fits before EOS (a completion
    without EOS has max_new_tokens words, longer than any answer) is accepted iff it is in ``answers``. So the
    exact expected reward is the probability of the one listed answer followed by EOS."""
    seqs = _sequences(task.words, task.max_new_tokens - 1)
    for ex in task.make_prompts(random.Random(3), 6):
        accepted = {" ".join(s) for s in seqs if task.verify(ex, " ".join(s)) == 1.0}
        assert accepted == set(task.answers(ex)) and len(accepted) == 1
        assert all(len(a.split()) == task.max_new_tokens - 1 for a in accepted)
    ans, exact = accepted_answers(task, ex)
    assert exact and ans == task.answers(ex)


def test_accepted_answers_without_answers_is_a_lower_bound():
    class NoAnswers:
        name, words, answer_words, max_new_tokens = "t", ("a",), ("a",), 2

        def make_prompts(self, rng, n):
            return [Example("a", "a")] * n

        def verify(self, example, completion):
            return 1.0

    assert accepted_answers(NoAnswers(), Example("a", "a")) == (["a"], False)
