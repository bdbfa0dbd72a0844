"""Where a library warning points: at the user's line, not at ours or at the framework's that called us.

``warnings.warn(..., stacklevel=n)`` needs ``n`` to reach past every frame of this package, and of the training
frameworks it plugs into (a Trainer callback is called from transformers' callback handler, several frames below the
user's ``trainer.train()``). Python 3.12's ``skip_file_prefixes`` does this by file; we support 3.10+.
"""

from __future__ import annotations

import sys
from types import FrameType

__all__ = ["FRAMEWORKS", "user_stacklevel", "user_site"]

#: Packages whose frames a warning skips: this one and the frameworks it is called from.
FRAMEWORKS = ("dgg_fused", "transformers", "trl", "accelerate", "deepspeed", "verl", "torch")


def _inside(frame: FrameType, packages: tuple[str, ...]) -> bool:
    name = frame.f_globals.get("__name__", "")
    return any(name == p or name.startswith(p + ".") for p in packages)


def user_stacklevel(packages: tuple[str, ...] = FRAMEWORKS) -> int:
    """The ``stacklevel`` that makes a ``warnings.warn`` in the calling function name the first frame outside
    ``packages`` (the outermost frame if every frame is inside)."""
    frame, level = sys._getframe(1), 1
    while frame.f_back is not None and _inside(frame, packages):
        frame, level = frame.f_back, level + 1
    return level


def user_site(packages: tuple[str, ...] = FRAMEWORKS) -> tuple[str, int, str]:
    """``(filename, lineno, module name)`` of the first frame outside ``packages``: where to attribute a warning
    that is raised later, far from the call that caused it (``warnings.warn_explicit``)."""
    frame = sys._getframe(1)
    while frame.f_back is not None and _inside(frame, packages):
        frame = frame.f_back
    return frame.f_code.co_filename, frame.f_lineno, frame.f_globals.get("__name__", "")
