"""The task interface of the RLVR demo, and the built-in tasks.

A task is anything with these members (a :class:`Task` protocol — no base class needed)::

    class MyTask:
        name = "my-task"                    # used in tables, file names and the warm-start cache key
        words = ("0", "1", ..., "=")         # every word a prompt or an answer may contain
        answer_words = ("0", "1", ...)       # the words an answer is made of (warm-start label noise draws here)
        max_new_tokens = 4                  # completion budget (answer words + the end-of-sequence token)

        def make_prompts(self, rng: random.Random, n: int) -> list[Example]:
            ...                             # n fresh examples; all randomness from rng (reproducible)

        def verify(self, example: Example, completion: str) -> float:
            ...                             # reward in [0, 1] for a completion (space-separated words, no EOS)

        def answers(self, example: Example) -> list[str]:   # optional
            ...                             # every completion verify() accepts (for the exact expected reward)

Text is a sequence of space-separated words; the demo's tokenizer has one token per word (plus thousands of
filler tokens no task uses, like a real LLM's vocabulary). ``Example.target`` is one correct answer: the
supervised warm start imitates it. The verifier must not need it — it should check the completion against the
prompt (the built-in tasks recompute the answer from the prompt), so that it can be trusted as a reward.

The testbed's primary metric is the *exact* expected reward on a fixed held-out prompt set: the probability,
by teacher forcing, that the policy samples an accepted completion (its words, then EOS). A task with
``answers(example)`` listing every accepted completion gets the exact value (the probabilities are summed); a
task without it gets the probability of ``example.target`` alone, a lower bound, and the report says so. Rewards
must be 0/1 for the value to be an expected reward. The built-in verifiers accept exactly one completion: the
answer recomputed from the prompt (``tests/test_tasks.py`` checks this by enumeration on small instances).

Pass your own task to the demo with ``python -m dgg_fused.demo --task my_module:MyTask`` (a class, instance or
zero-argument factory).
"""

from __future__ import annotations

import importlib
import random
from dataclasses import dataclass
from typing import Protocol, Sequence, runtime_checkable

__all__ = ["Example", "Task", "AdditionTask", "ReversalTask", "ProductTask", "BUILTIN_TASKS", "load_task",
           "check_task", "accepted_answers"]


@dataclass(frozen=True)
class Example:
    """One prompt and one correct answer (space-separated words)."""

    prompt: str
    target: str


@runtime_checkable
class Task(Protocol):
    """What the demo needs from a task (see the module docstring)."""

    name: str
    words: Sequence[str]
    answer_words: Sequence[str]
    max_new_tokens: int

    def make_prompts(self, rng: random.Random, n: int) -> list[Example]: ...

    def verify(self, example: Example, completion: str) -> float: ...


_DIGITS = tuple(str(d) for d in range(10))


class _DigitsTask:
    """``a <op> b`` on digit strings: ``a`` has ``digits`` digits, ``b`` has ``b_digits`` (zero-padded in the prompt);
    the answer is the result zero-padded to ``digits + 1`` digits. Subclasses set the operator, its name and
    ``b_digits``."""

    answer_words = _DIGITS
    symbol: str
    name_format: str  # e.g. "addition{digits}"

    def __init__(self, digits: int = 2) -> None:
        if digits < 1:
            raise ValueError(f"digits must be >= 1, got {digits}")
        self.digits = digits
        self.name = self.name_format.format(digits=digits)
        self.words = _DIGITS + (self.symbol, "=")
        self.max_new_tokens = digits + 2  # digits+1 answer digits, then EOS

    @property
    def b_digits(self) -> int:
        return self.digits

    @staticmethod
    def _apply(a: int, b: int) -> int:
        raise NotImplementedError

    def make_prompts(self, rng: random.Random, n: int) -> list[Example]:
        hi, hi_b = 10**self.digits - 1, 10**self.b_digits - 1
        out = []
        for _ in range(n):
            a, b = rng.randint(0, hi), rng.randint(0, hi_b)
            da, db = " ".join(str(a).zfill(self.digits)), " ".join(str(b).zfill(self.b_digits))
            out.append(Example(f"{da} {self.symbol} {db} =", " ".join(str(self._apply(a, b)).zfill(self.digits + 1))))
        return out

    def verify(self, example: Example, completion: str) -> float:
        return float(completion.split() == self._want(example))

    def _want(self, example: Example) -> list[str]:
        left, _, right = example.prompt.replace("=", "").partition(self.symbol)
        a, b = int("".join(left.split())), int("".join(right.split()))
        return list(str(self._apply(a, b)).zfill(self.digits + 1))

    def answers(self, example: Example) -> list[str]:
        """The one completion :meth:`verify` accepts."""
        return [" ".join(self._want(example))]


class AdditionTask(_DigitsTask):
    """``a + b`` for ``digits``-digit numbers; the answer is the sum zero-padded to ``digits + 1`` digits.

    Prompt ``"3 4 + 5 6 ="`` → answer ``"0 9 0"``. Reward 1.0 for the exact digits, else 0.0.
    """

    symbol, name_format = "+", "addition{digits}"

    @staticmethod
    def _apply(a: int, b: int) -> int:
        return a + b


class ReversalTask:
    """Reverse a sequence of ``length`` letters drawn from the first ``alphabet`` letters of a-z.

    Prompt ``"c a h b d >"`` → answer ``"d b h a c"``. Reward 1.0 for the exact reversal, else 0.0.
    """

    def __init__(self, length: int = 5, alphabet: int = 8) -> None:
        if not (1 <= alphabet <= 26) or length < 1:
            raise ValueError(f"need length >= 1 and 1 <= alphabet <= 26, got {length}, {alphabet}")
        self.length = length
        self.name = f"reversal{length}"
        self.answer_words = tuple("abcdefghijklmnopqrstuvwxyz"[:alphabet])
        self.words = self.answer_words + (">",)
        self.max_new_tokens = length + 1

    def make_prompts(self, rng: random.Random, n: int) -> list[Example]:
        out = []
        for _ in range(n):
            seq = [rng.choice(self.answer_words) for _ in range(self.length)]
            out.append(Example(" ".join(seq) + " >", " ".join(reversed(seq))))
        return out

    def verify(self, example: Example, completion: str) -> float:
        seq = example.prompt.replace(">", "").split()
        return float(completion.split() == seq[::-1])

    def answers(self, example: Example) -> list[str]:
        """The one completion :meth:`verify` accepts."""
        return [" ".join(example.prompt.replace(">", "").split()[::-1])]


class ProductTask(_DigitsTask):
    """``a * b`` for a ``digits``-digit ``a`` and a one-digit ``b``; the answer is the product zero-padded to
    ``digits + 1`` digits.

    Prompt ``"4 7 * 6 ="`` → answer ``"2 8 2"``. Reward 1.0 for the exact digits, else 0.0. Harder for the
    testbed's policy than addition (a carry chain through a multiplication table), so its RL gains are small.
    """

    symbol, name_format = "*", "product{digits}x1"

    @property
    def b_digits(self) -> int:
        return 1

    @staticmethod
    def _apply(a: int, b: int) -> int:
        return a * b


def accepted_answers(task: Task, example: Example) -> tuple[list[str], bool]:
    """``(completions, exact)``: every completion the verifier accepts when the task lists them
    (``task.answers``), else ``[example.target]`` with ``exact=False`` (the expected reward is then a lower
    bound)."""
    fn = getattr(task, "answers", None)
    if not callable(fn):
        return [example.target], False
    return list(fn(example)), True


#: Tasks available by short name on the command line.
BUILTIN_TASKS = {"addition": AdditionTask, "reversal": ReversalTask, "product": ProductTask}


def check_task(task: object) -> Task:
    """Validate that ``task`` implements :class:`Task`; returns it or raises ``TypeError``/``ValueError``."""
    missing = [m for m in ("name", "words", "answer_words", "max_new_tokens", "make_prompts", "verify")
               if not hasattr(task, m)]
    if missing:
        raise TypeError(f"task {task!r} lacks {missing}; see dgg_fused.demo.tasks for the interface")
    if not isinstance(task.max_new_tokens, int) or task.max_new_tokens < 1:
        raise ValueError(f"task.max_new_tokens must be a positive int, got {task.max_new_tokens!r}")
    if not set(task.answer_words) <= set(task.words):
        raise ValueError("task.answer_words must be a subset of task.words")
    for w in task.words:
        if not isinstance(w, str) or not w or any(c.isspace() for c in w):
            raise ValueError(f"task.words must be non-empty strings without spaces, got {w!r}")
    return task  # type: ignore[return-value]


def load_task(spec: str) -> Task:
    """A built-in task name (``"addition"``, ``"reversal"``) or ``"module:attr"`` (a class, factory or instance)."""
    if spec in BUILTIN_TASKS:
        return check_task(BUILTIN_TASKS[spec]())
    if ":" not in spec:
        raise ValueError(f"unknown task {spec!r}: use one of {sorted(BUILTIN_TASKS)} or 'module:attr'")
    mod_name, _, attr = spec.partition(":")
    obj = getattr(importlib.import_module(mod_name), attr)
    if isinstance(obj, type) or (callable(obj) and not hasattr(obj, "make_prompts")):
        obj = obj()
    return check_task(obj)
