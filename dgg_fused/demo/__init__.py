"""The RLVR reuse testbed: ``python -m dgg_fused.demo`` (docs/demo.md).

GRPO on a small ``transformers`` Llama with an LLM-sized vocabulary, on verifiable tasks, comparing single use
(K=1), fixed and naive reuse, KL early stop, DGG and the library's drift gates on identical seeds. The primary
metric is the exact expected reward on a fixed held-out prompt set (:mod:`dgg_fused.demo.evaluate`); the harm
oracle (:class:`dgg_fused.monitor.HarmOracle`) scores candidate gate signals step by step. Needs the ``demo``
extra: ``transformers``, ``tokenizers``, ``matplotlib``.
"""

from .tasks import AdditionTask, Example, ProductTask, ReversalTask, Task, load_task

__all__ = ["Task", "Example", "AdditionTask", "ReversalTask", "ProductTask", "load_task"]
