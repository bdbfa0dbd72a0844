"""Testing utilities: the host-sync detector that the test suite and the benchmarks share, and the one hook
through which a test looks inside a :class:`~dgg_fused.GatedOptimizer` (:func:`internals`).

A training step is *sync-free* when the host never waits for a value computed on the device. On a GPU,
``torch.cuda.set_sync_debug_mode("error")`` proves it for everything torch knows is a sync; on a CPU nothing really
syncs, so :func:`record_syncs` records the operations that *would* make the host wait on an accelerator:

* ops that read a device value on the host: ``aten._local_scalar_dense`` (``.item()``, ``bool(t)``, ``float(t)``,
  ``if t:``), ``nonzero``, ``equal``, ``masked_select``, ``unique``, ``repeat_interleave`` (data-dependent shapes),
  indexing with a boolean mask;
* host copies: ``.cpu()``, ``.to("cpu")`` / ``.to(device="cpu")`` of a tensor on the watched device, blocking
  device-to-host ``copy_``, ``.tolist()``, ``.numpy()``, and printing or formatting a tensor (``repr``/``str``/
  ``format``);
* the same inside custom ops: a ``TorchDispatchMode`` sees a custom op as one unit, so the recorder runs each
  non-aten op's kernel (CPU or CUDA key) itself, with the recorder active, and sees the ops of its body.

On CUDA, :func:`record_syncs` also switches torch's sync debug mode to ``"warn"`` and records its warnings (syncs
inside C++ and CUDA code that no dispatch mode sees).
"""

from __future__ import annotations

import contextlib
import warnings
from typing import Any, Iterator, NamedTuple

import torch
from torch.utils._python_dispatch import TorchDispatchMode

__all__ = ["SyncRecorder", "record_syncs", "SYNC_OPS", "Internals", "internals"]


class Internals(NamedTuple):
    """The live internals of one :class:`~dgg_fused.GatedOptimizer` (see :func:`internals`).

    Attributes:
        gate: the device-resident :class:`~dgg_fused.gate.GateState` (window, filled, prev_energy, stopped, ...).
        meter: the :class:`~dgg_fused.energy.EnergyMeter` (``meter.pending``: the measurement the next step would
            consider, recorded or made by the energy hook; ``meter.measure()``: what the step would measure now).
        pending_drift: a copy of the drift statistics handed to ``record_drift`` for the next step (name -> 0-d
            tensor; empty when none was recorded).
    """

    gate: Any
    meter: Any
    pending_drift: dict


def internals(optimizer: Any) -> Internals:
    """The one testing hook: what a test may read (or, to stage a scenario, replace) inside a
    :class:`~dgg_fused.GatedOptimizer`. Everything else a test needs is public API (``opt.plan``, ``opt.metrics``,
    ``opt.state_dict()["dgg"]``, ...). Not for training code: these objects change with the implementation."""
    gate, meter = getattr(optimizer, "_gate", None), getattr(optimizer, "_meter", None)
    if gate is None or meter is None:
        raise TypeError(f"internals() expects a GatedOptimizer, got {type(optimizer).__name__}")
    return Internals(gate, meter, dict(getattr(optimizer, "_pending_drift", {})))

#: aten ops that read a device value on the host (or have a data-dependent output shape).
SYNC_OPS = frozenset(
    {
        "aten::_local_scalar_dense",
        "aten::item",  # seen as such inside a custom op's body (outside, it arrives as _local_scalar_dense)
        "aten::equal",
        "aten::nonzero",
        "aten::nonzero_static",
        "aten::masked_select",
        "aten::unique",
        "aten::_unique2",
        "aten::unique_consecutive",
        "aten::repeat_interleave",
    }
)

_PASSTHROUGH_NAMESPACES = ("aten", "prims", "prim", "_c10d_functional", "c10d")


class SyncRecorder(TorchDispatchMode):
    """Records every operation of a region that synchronises (or would synchronise) the host with ``device``.

    ``events`` lists them in order (op names, ``"Tensor.cpu"``, ``"print"``, ...); :attr:`count` is their number.
    Use :func:`record_syncs`, which also patches the Python-level host copies.
    """

    def __init__(self, device: torch.device | str | None = None) -> None:
        super().__init__()
        self.device = None if device is None else torch.device(device)
        self.events: list[str] = []

    @property
    def count(self) -> int:
        return len(self.events)

    def _watched(self, t: object) -> bool:
        """``t`` lives on the watched device (any device when none was named)."""
        return isinstance(t, torch.Tensor) and (self.device is None or t.device.type == self.device.type)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func._schema.name
        namespace = name.split("::", 1)[0]
        if _printing.active:  # the ops of printing a tensor were recorded as one "print" event
            return func(*args, **kwargs)
        if name in SYNC_OPS:
            self.events.append(name)
        elif name in ("aten::index", "aten::index_put_", "aten::index_put"):
            idx = args[1] if len(args) > 1 else []
            if any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in (idx or [])):
                self.events.append(name + "(bool mask)")
        elif name in ("aten::copy_", "aten::_to_copy"):
            src = args[1] if name == "aten::copy_" else args[0]
            dst_dev = args[0].device if name == "aten::copy_" else kwargs.get("device", src.device)
            nb = kwargs.get("non_blocking", args[2] if name == "aten::copy_" and len(args) > 2 else False)
            d2h = isinstance(src, torch.Tensor) and src.device.type != "cpu" and torch.device(dst_dev).type == "cpu"
            if d2h and self._watched(src) and not nb:
                self.events.append(name + "(device->host)")
        elif namespace not in _PASSTHROUGH_NAMESPACES:
            # A custom op: run its kernel for the tensors' device ourselves, with this recorder active, so that the
            # aten ops of its body (a Python kernel, or C++ code calling into aten) are seen too.
            key = torch._C.DispatchKey.CUDA if any(
                isinstance(a, torch.Tensor) and a.is_cuda for a in _flat(args, kwargs)
            ) else torch._C.DispatchKey.CPU
            with self:
                return func.redispatch(torch._C.DispatchKeySet(key), *args, **kwargs)
        return func(*args, **kwargs)


def _flat(args, kwargs) -> Iterator[object]:
    for a in list(args) + list(kwargs.values()):
        if isinstance(a, (list, tuple)):
            yield from a
        else:
            yield a


def _to_target(args, kwargs) -> tuple[torch.device | None, bool]:
    """The target device of a ``Tensor.to`` call, and whether it was spelled as a string (``"cpu"``)."""
    dev = kwargs.get("device")
    if dev is None:
        for a in args:
            if isinstance(a, (str, torch.device)):
                dev = a
                break
            if isinstance(a, torch.Tensor):
                dev = a.device
                break
    return (None, False) if dev is None else (torch.device(dev), isinstance(dev, str))


@contextlib.contextmanager
def record_syncs(device: torch.device | str | None = None) -> Iterator[SyncRecorder]:
    """Record the host syncs of the ``with`` block (see the module docstring); yields the :class:`SyncRecorder`.

    ``device``: the device whose values must stay on it (default: every device — on a CPU-only run, the CPU; torch's
    CUDA sync debug mode is switched on whenever CUDA is available and ``device`` is not ``"cpu"``). On a CPU run,
    every ``.cpu()`` / ``.to("cpu")`` of a CPU tensor counts: on a GPU it would be a device-to-host copy (code that
    counts as it would on a GPU, and so does ``.to("cpu")`` spelled with a string; ``.to(x.device)`` with a
    ``torch.device`` counts only on an accelerator run (on a CPU run it is the device-agnostic idiom, a no-op on a GPU
    when ``x`` lives there too).
    """
    dev = None if device is None else torch.device(device)
    rec = SyncRecorder(dev)
    T = torch.Tensor
    orig = {n: getattr(T, n) for n in ("tolist", "numpy", "cpu", "to", "__repr__", "__format__")}

    def note(what):
        def f(self, *a, **k):
            if rec._watched(self) and not _printing.active:
                rec.events.append(f"Tensor.{what}")
            return orig[what](self, *a, **k)

        return f

    def to(self, *a, **k):
        target, literal = _to_target(a, k)
        # On a CPU tensor, `t.to(x.device)` with x on the same device is the idiom of device-agnostic code (a
        # no-op on a GPU too), so a torch.device target counts only for an accelerator tensor; "cpu" always does.
        if (
            rec._watched(self) and target is not None and target.type == "cpu" and not _printing.active
            and (literal or self.device.type != "cpu")
        ):
            rec.events.append("Tensor.to(cpu)")
        return orig["to"](self, *a, **k)

    def shown(what):
        def f(self, *a, **k):
            if _printing.active:
                return orig[what](self, *a, **k)
            if rec._watched(self):
                rec.events.append(f"print ({what})")
            _printing.active = True
            try:
                return orig[what](self, *a, **k)
            finally:
                _printing.active = False

        return f

    patches = {"tolist": note("tolist"), "numpy": note("numpy"), "cpu": note("cpu"), "to": to,
               "__repr__": shown("__repr__"), "__format__": shown("__format__")}  # fmt: skip
    for n, f in patches.items():
        setattr(T, n, f)
    cuda_debug = torch.cuda.is_available() and (dev is None or dev.type == "cuda")
    prev_mode = torch.cuda.get_sync_debug_mode() if cuda_debug else None
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            if cuda_debug:
                torch.cuda.set_sync_debug_mode("warn")
            try:
                with rec:
                    yield rec
            finally:
                if cuda_debug:
                    torch.cuda.set_sync_debug_mode(prev_mode)
        for w in caught:
            if cuda_debug and "synchroniz" in str(w.message).lower():
                rec.events.append(f"cuda sync: {str(w.message).splitlines()[0]}")
            else:  # not ours: hand it on
                warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    finally:
        for n, f in orig.items():
            setattr(T, n, f)


class _Printing:
    active = False


_printing = _Printing()
