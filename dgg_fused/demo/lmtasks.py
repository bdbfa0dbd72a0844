"""Verifiable tasks for the pretrained policy (:mod:`dgg_fused.demo.lm`), posed as text in its own tokenizer.

**Prompts.** Short raw few-shot prompts, no chat template: a fixed prefix of ``shots`` solved examples, one per
line (drawn once from ``shot_seed``; the same for every prompt, like a system prompt), then the question, e.g.
``"6*6=36\n0*4=0\n7*8="``. The completion ends at the first **newline token** (``"\n"``, id 198 in SmolLM2: the
stop token the sampler stops on), as a base-model evaluation with a newline stop sequence does. Why not the chat
template and ``<|im_end|>`` (the GGUF file's EOS): zero-shot the instruct model explains instead of answering (the
expected reward of a bare answer was below 0.0001 with the chat template and ``<|im_end|>``, at most 0.011 raw with
a newline stop, on five tasks), and the template's tokens would double the prompt. After two shots the model
answers in the format, and after a correct answer the newline token carries 0.82–0.90 of the next-token mass
(``<|im_end|>`` at most 0.003, ``<|endoftext|>`` below 0.0001).

**The verifier** reads a completion as text (:meth:`dgg_fused.demo.lm.TokenBytes.text`: the tokens before the
stop token, decoded, no whitespace normalisation) and accepts exactly the answer's digits: ``"56"``, not
``" 56"`` nor ``"56 "``. A strict reading keeps the accepted set finite and small — stripping whitespace would
accept any of the vocabulary's many whitespace tokens around the digits — and the prompt's shots show the format.
What it costs is negligible: on the tasks below the answer after a leading space (then the stop token) has
probability 0.0003–0.0012 under the initial policy.

**The exact expected reward.** A sampled completion is accepted iff it is a token sequence that reads as an
accepted text, followed by the stop token: :func:`accepted_sequences` lists every such sequence (every split of
the text's bytes into token byte strings, not only the tokenizer's own encoding; SmolLM2 has one token per digit
and no token mixing digits with anything else, so each answer has exactly one), so summing their teacher-forced
probabilities gives J exactly. A completion that never emits the stop token has ``max_new_tokens`` tokens of at
least one byte each, and ``max_new_tokens`` exceeds the longest accepted text's length in bytes: it never reads
as an accepted text, so "followed by the stop token" costs no generality. :func:`accepted_sequences` checks that
bound and reports ``exact=False`` (a lower bound) when a tokenizer has tokens that read as empty text.
"""

from __future__ import annotations

import random
from typing import Sequence

from .tasks import Example

__all__ = ["FewShotTask", "SumTask", "TimesTask", "ProductTask2x1", "SuccessorTask", "CopyTask", "LM_TASKS",
           "STOP_TEXT", "accepted_sequences"]

#: The stop token's text: a completion ends at the first newline token.
STOP_TEXT = "\n"


class FewShotTask:
    """A one-line question with a short answer, after a fixed prefix of ``shots`` solved examples (one per line).

    ``prefix`` (the shots, drawn once from ``shot_seed``) is the same for every prompt, like a system prompt or
    a fixed few-shot template in RLVR practice, so the policy computes it once per batch and shares it
    (``prefix_ids`` in :mod:`dgg_fused.demo.grpo`). ``Example.prompt`` is the question alone (what the verifier
    reads); the model sees ``prefix + prompt``. Subclasses define :meth:`draw` (a random question), :meth:`solve` (its answer, recomputed
    from the question alone: the verifier trusts nothing else) and ``max_answer`` (the longest answer in
    characters, which bounds ``max_new_tokens``).
    """

    name: str
    max_answer: int

    def __init__(self, shots: int = 2, shot_seed: int = 0) -> None:
        if shots < 0:
            raise ValueError(f"shots must be >= 0, got {shots}")
        self.shots, self.shot_seed = shots, shot_seed
        rng = random.Random(shot_seed)
        self.prefix = "".join(q + self.solve(q) + STOP_TEXT for q in (self.draw(rng) for _ in range(shots)))
        self.max_new_tokens = self.max_answer + 1  # the answer's tokens (one or more characters each), then stop

    def draw(self, rng: random.Random) -> str:
        raise NotImplementedError

    def solve(self, question: str) -> str:
        raise NotImplementedError

    def make_prompts(self, rng: random.Random, n: int) -> list[Example]:
        out = []
        for _ in range(n):
            q = self.draw(rng)
            out.append(Example(q, self.solve(q)))
        return out

    def answers(self, example: Example) -> list[str]:
        """The one text :meth:`verify` accepts."""
        return [self.solve(example.prompt)]

    def verify(self, example: Example, completion: str) -> float:
        """1.0 iff the completion's text (before the stop token) is the answer exactly."""
        return float(completion == self.solve(example.prompt))


class _BinaryOp(FewShotTask):
    symbol: str

    def __init__(self, shots: int = 2, shot_seed: int = 0, a_digits: int = 1, b_digits: int = 1) -> None:
        self.a_digits, self.b_digits = a_digits, b_digits
        super().__init__(shots, shot_seed)

    def _lo_hi(self, digits: int) -> tuple[int, int]:
        return (0 if digits == 1 else 10 ** (digits - 1)), 10**digits - 1

    def draw(self, rng: random.Random) -> str:
        a, b = rng.randint(*self._lo_hi(self.a_digits)), rng.randint(*self._lo_hi(self.b_digits))
        return f"{a}{self.symbol}{b}="

    def solve(self, question: str) -> str:
        a, b = question.rstrip("=").split(self.symbol)
        return str(self._apply(int(a), int(b)))

    @staticmethod
    def _apply(a: int, b: int) -> int:
        raise NotImplementedError


class SumTask(_BinaryOp):
    """``a+b=`` for one-digit ``a`` and ``b`` (answer ``0``–``18``)."""

    symbol, name, max_answer = "+", "sum1", 2

    @staticmethod
    def _apply(a: int, b: int) -> int:
        return a + b


class TimesTask(_BinaryOp):
    """``a*b=`` for one-digit ``a`` and ``b``: the multiplication table (answer ``0``–``81``)."""

    symbol, name, max_answer = "*", "times1", 2

    @staticmethod
    def _apply(a: int, b: int) -> int:
        return a * b


class ProductTask2x1(_BinaryOp):
    """``a*b=`` for a two-digit ``a`` and a one-digit ``b`` (answer up to ``891``)."""

    symbol, name, max_answer = "*", "product2x1", 3

    def __init__(self, shots: int = 2, shot_seed: int = 0) -> None:
        super().__init__(shots, shot_seed, a_digits=2, b_digits=1)

    @staticmethod
    def _apply(a: int, b: int) -> int:
        return a * b


class SuccessorTask(FewShotTask):
    """``n->`` for a two-digit ``n``: the answer is ``n + 1``."""

    name, max_answer = "successor", 3

    def draw(self, rng: random.Random) -> str:
        return f"{rng.randint(10, 99)}->"

    def solve(self, question: str) -> str:
        return str(int(question[:-2]) + 1)


class CopyTask(FewShotTask):
    """``dddd->``: copy ``length`` random digits."""

    max_answer = 4

    def __init__(self, shots: int = 2, shot_seed: int = 0, length: int = 4) -> None:
        self.length = length
        self.max_answer = length
        self.name = f"copy{length}"
        super().__init__(shots, shot_seed)

    def draw(self, rng: random.Random) -> str:
        return "".join(rng.choice("0123456789") for _ in range(self.length)) + "->"

    def solve(self, question: str) -> str:
        return question[:-2]


#: The pretrained policy's tasks by short name.
LM_TASKS = {"sum": SumTask, "times": TimesTask, "product": ProductTask2x1, "successor": SuccessorTask,
            "copy": CopyTask}


def accepted_sequences(token_bytes, texts: Sequence[str], stop_id: int,
                       max_new_tokens: int) -> tuple[list[list[int]], bool]:
    """``(rows, exact)``: every token sequence a sampled completion accepted as one of ``texts`` can be (a
    sequence reading as the text, then ``stop_id``), see the module doc. ``exact`` is False when the tokenizer
    has tokens that read as empty text (then more sequences read as each text, and the probability summed over
    ``rows`` is a lower bound).

    Raises ``ValueError`` when ``max_new_tokens`` is too small: a row must fit, and a completion cut at
    ``max_new_tokens`` without the stop token must not read as an accepted text.
    """
    rows: list[list[int]] = []
    for t in dict.fromkeys(texts):
        n_bytes = len(t.encode("utf-8"))
        if n_bytes >= max_new_tokens:
            raise ValueError(f"max_new_tokens={max_new_tokens} must exceed the accepted text's {n_bytes} bytes "
                             f"({t!r}), or a completion cut without the stop token could be accepted")
        rows.extend(seq + [stop_id] for seq in token_bytes.sequences(t, exclude=(stop_id,)))
    return rows, not token_bytes.empty
