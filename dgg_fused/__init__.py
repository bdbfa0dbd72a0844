"""dgg_fused: Dynamic Gradient Gating (DGG) for sample-efficient RLVR rollout reuse, as a drop-in optimizer wrapper.

    from dgg_fused import GatedOptimizer
    opt = GatedOptimizer(torch.optim.AdamW(model.parameters(), fused=True), lm_head=model.lm_head)

Importing it loads neither ``torch._dynamo`` nor triton (tests/test_import.py); the compiled extension and the
Triton kernels are loaded when a backend first needs them.
"""

from .config import ACTIONS, COMBINES, DRIFT_RULES, DRIFT_STATS, REFERENCES, STATISTICS, GateConfig
from .drift import drift_stats
from .lm_head import TiedLmHeadWarning, find_lm_head, is_tied
from .ops import available_backends, grad_sumsq
from .optimizer import SKIP_MODES, GatedOptimizer

__version__ = "0.1.0"

__all__ = [
    "GatedOptimizer",
    "GateConfig",
    "STATISTICS",
    "REFERENCES",
    "DRIFT_STATS",
    "DRIFT_RULES",
    "COMBINES",
    "ACTIONS",
    "drift_stats",
    "SKIP_MODES",
    "find_lm_head",
    "is_tied",
    "TiedLmHeadWarning",
    "grad_sumsq",
    "available_backends",
    "__version__",
]
