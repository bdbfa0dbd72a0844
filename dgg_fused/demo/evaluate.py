"""The testbed's primary metric: the exact expected reward of the policy on a fixed held-out prompt set.

For a 0/1 verifier, the expected reward of a prompt under the sampling policy (temperature 1, the rollouts'
policy) is the probability that a sampled completion is accepted. The built-in tasks accept exactly one completion
(the answer recomputed from the prompt, then EOS: ``tests/test_tasks.py`` enumerates small instances), so

    J(prompt) = P(answer words, EOS | prompt) = exp(sum of the teacher-forced log-probs of those tokens)

is exact and free of sampling noise; a task listing several accepted completions (``Task.answers``) gets their
probabilities summed, and a task that lists none gets the probability of ``Example.target`` alone — a lower bound
(``HeldOut.exact`` is then False and the report says so). Which token rows a completion can be is the policy
codec's answer (:meth:`dgg_fused.demo.policy.Codec.answer_rows`): one per answer for the toy's word-level
tokenizer, every token sequence that reads as the answer's text (then the newline stop token) for the pretrained
policy. ``tests/test_evaluate.py`` checks J against brute-force sampling on a tiny policy, ``tests/test_lm.py``
against an enumeration of every completion of a tiny pretrained-format model.

Secondary: greedy accuracy on the same prompts (a deterministic decode through the task's verifier).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from .tasks import Example, Task

__all__ = ["HeldOut"]


@dataclass
class HeldOut:
    """A fixed held-out prompt set, encoded once for teacher forcing by the policy's codec
    (:class:`dgg_fused.demo.policy.Codec`).

    Build with :meth:`build`. ``exact`` is False when some task answers were not enumerable (lower bound).
    """

    task: Task
    codec: Any
    examples: list[Example]
    exact: bool
    prompt_ids: torch.Tensor  # [M, P] one row per (example, accepted completion)
    prompt_mask: torch.Tensor
    comp_ids: torch.Tensor  # [M, T] an accepted completion's tokens then the stop token, right padded
    comp_mask: torch.Tensor  # [M, T] float
    owner: torch.Tensor  # [M] long: the example each row belongs to

    @classmethod
    def build(cls, task: Task, codec, examples: list[Example]) -> "HeldOut":
        prompts, rows, owner = [], [], []
        exact = True
        for i, ex in enumerate(examples):
            r, ok = codec.answer_rows(task, ex)
            exact &= ok
            rows += r
            prompts += [ex.prompt] * len(r)
            owner += [i] * len(r)
        if not rows:
            raise ValueError(f"task {task.name!r}: no accepted completion of any held-out prompt can be sampled")
        p_ids, p_mask = codec.encode(prompts)
        width = max(len(r) for r in rows)
        c_ids = torch.full((len(rows), width), codec.pad_id, dtype=torch.long)
        c_mask = torch.zeros(len(rows), width)
        for j, r in enumerate(rows):
            c_ids[j, : len(r)] = torch.tensor(r)
            c_mask[j, : len(r)] = 1.0
        return cls(task, codec, list(examples), exact, p_ids, p_mask, c_ids, c_mask,
                   torch.tensor(owner, dtype=torch.long))

    @torch.no_grad()
    def per_prompt(self, model) -> torch.Tensor:
        """``[n_examples]`` float64: the probability of an accepted completion for each held-out prompt."""
        logp = self.codec.logprobs(model, self.prompt_ids, self.prompt_mask, self.comp_ids, self.comp_mask)
        p = logp.double().sum(dim=1).exp()
        return torch.zeros(len(self.examples), dtype=torch.float64).index_add_(0, self.owner, p)

    def expected_reward(self, model) -> float:
        """Mean over the held-out prompts of :meth:`per_prompt` (exact for 0/1 verifiers; see module doc)."""
        return float(self.per_prompt(model).mean())

    @torch.no_grad()
    def greedy_accuracy(self, model) -> float:
        """Fraction of held-out prompts whose greedy completion the verifier accepts."""
        p_ids, p_mask = self.codec.encode([ex.prompt for ex in self.examples])
        c_ids, c_mask = self.codec.sample(model, p_ids, p_mask, self.task.max_new_tokens, greedy=True)
        texts = self.codec.decode(c_ids, c_mask)
        return sum(self.task.verify(ex, t) for ex, t in zip(self.examples, texts)) / len(texts)
