"""The demo's task interface: verifiers recompute the answer from the prompt; prompts are reproducible."""

import random

import pytest

from dgg_fused.demo.tasks import AdditionTask, Example, ReversalTask, Task, check_task, load_task


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


@pytest.mark.parametrize("task", [AdditionTask(), AdditionTask(digits=3), ReversalTask(), ReversalTask(3, 4)])
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
