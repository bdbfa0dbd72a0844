"""The testbed's primary metric: the exact expected reward of the policy on a fixed held-out prompt set.

For a 0/1 verifier, the expected reward of a prompt under the sampling policy (temperature 1, the rollouts'
policy) is the probability that a sampled completion is accepted. The built-in tasks accept exactly one completion
(the answer recomputed from the prompt, then EOS: ``tests/test_tasks.py`` enumerates small instances), so

    J(prompt) = P(answer words, EOS | prompt) = exp(sum of the teacher-forced log-probs of those tokens)

is exact and free of sampling noise; a task listing several accepted completions (``Task.answers``) gets their
probabilities summed, and a task that lists none gets the probability of ``Example.target`` alone — a lower bound
(``HeldOut.exact`` is then False and the report says so). ``tests/test_evaluate.py`` checks J against brute-force
sampling on a tiny policy.

Secondary: greedy accuracy on the same prompts (a deterministic decode through the task's verifier).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from .grpo import completion_logprobs, decode_completions, encode_prompts, generate
from .tasks import Example, Task, accepted_answers

__all__ = ["HeldOut"]


@dataclass
class HeldOut:
    """A fixed held-out prompt set, encoded once for teacher forcing.

    Build with :meth:`build`. ``exact`` is False when some task answers were not enumerable (lower bound).
    """

    task: Task
    tokenizer: Any
    examples: list[Example]
    exact: bool
    prompt_ids: torch.Tensor  # [M, P] one row per (example, accepted answer)
    prompt_mask: torch.Tensor
    comp_ids: torch.Tensor  # [M, T] answer tokens then EOS, right padded
    comp_mask: torch.Tensor  # [M, T] float
    owner: torch.Tensor  # [M] long: the example each row belongs to

    @classmethod
    def build(cls, task: Task, tokenizer, examples: list[Example]) -> "HeldOut":
        prompts, answers, owner = [], [], []
        exact = True
        for i, ex in enumerate(examples):
            ans, ok = accepted_answers(task, ex)
            exact &= ok
            for a in ans:
                prompts.append(ex.prompt)
                answers.append(a)
                owner.append(i)
        p_ids, p_mask = encode_prompts(tokenizer, prompts)
        eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
        rows = [tokenizer.convert_tokens_to_ids(a.split()) + [eos] for a in answers]
        if any(tokenizer.unk_token_id in r for r in rows):
            raise ValueError("an accepted answer contains a word outside the task's vocabulary")
        width = max(len(r) for r in rows)
        c_ids = torch.full((len(rows), width), pad, dtype=torch.long)
        c_mask = torch.zeros(len(rows), width)
        for j, r in enumerate(rows):
            c_ids[j, : len(r)] = torch.tensor(r)
            c_mask[j, : len(r)] = 1.0
        return cls(task, tokenizer, list(examples), exact, p_ids, p_mask, c_ids, c_mask,
                   torch.tensor(owner, dtype=torch.long))

    @torch.no_grad()
    def per_prompt(self, model) -> torch.Tensor:
        """``[n_examples]`` float64: the probability of an accepted completion for each held-out prompt."""
        logp = completion_logprobs(model, self.prompt_ids, self.prompt_mask, self.comp_ids, self.comp_mask)
        p = logp.double().sum(dim=1).exp()
        return torch.zeros(len(self.examples), dtype=torch.float64).index_add_(0, self.owner, p)

    def expected_reward(self, model) -> float:
        """Mean over the held-out prompts of :meth:`per_prompt` (exact for 0/1 verifiers; see module doc)."""
        return float(self.per_prompt(model).mean())

    @torch.no_grad()
    def greedy_accuracy(self, model) -> float:
        """Fraction of held-out prompts whose greedy completion the verifier accepts."""
        tok = self.tokenizer
        p_ids, p_mask = encode_prompts(tok, [ex.prompt for ex in self.examples])
        c_ids, c_mask = generate(model, p_ids, p_mask, self.task.max_new_tokens, tok.eos_token_id,
                                 tok.pad_token_id, greedy=True)
        texts = decode_completions(tok, c_ids, c_mask, tok.eos_token_id)
        return sum(self.task.verify(ex, t) for ex, t in zip(self.examples, texts)) / len(texts)
