"""The RLVR reuse testbed: ``python -m dgg_fused.demo`` (docs/demo.md).

GRPO on a small ``transformers`` Llama with an LLM-sized vocabulary, on verifiable tasks, comparing single use
(K=1), naive reuse, fixed K=2, KL early stop and DGG on identical seeds, with the DWD monitor
(:mod:`dgg_fused.monitor`). Needs the ``demo`` extra: ``transformers``, ``tokenizers``, ``matplotlib``, ``tqdm``.
"""

from .tasks import AdditionTask, Example, ReversalTask, Task, load_task

__all__ = ["Task", "Example", "AdditionTask", "ReversalTask", "load_task"]
