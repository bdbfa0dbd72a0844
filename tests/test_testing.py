"""dgg_fused.testing: the host-sync detector the tests and the benchmarks share (D9: it sees host copies, printing
and syncs inside custom ops, not only the sync ops a dispatch mode sees at top level)."""

from __future__ import annotations

import pytest
import torch

from dgg_fused.testing import record_syncs

torch.library.define("dgg_test::syncs_inside", "(Tensor t) -> Tensor")


@torch.library.register_kernel("dgg_test::syncs_inside", "cpu")
def _syncs_inside(t):
    return t * t.sum().item()  # a host read hidden in an op body


T = torch.ones(3)


@pytest.mark.parametrize(
    "name,fn,expected",
    [
        ("item", lambda: T.sum().item(), "aten::_local_scalar_dense"),
        ("bool", lambda: bool(T[0] > 0), "aten::_local_scalar_dense"),
        ("cpu", lambda: T.cpu(), "Tensor.cpu"),
        ("to-str", lambda: T.to("cpu"), "Tensor.to(cpu)"),
        ("to-kw", lambda: T.to(device="cpu"), "Tensor.to(cpu)"),
        ("tolist", lambda: T.tolist(), "Tensor.tolist"),
        ("numpy", lambda: T.numpy(), "Tensor.numpy"),
        ("repr", lambda: repr(T), "print (__repr__)"),
        ("format", lambda: f"{T}", "print (__format__)"),
        ("nonzero", lambda: T.nonzero(), "aten::nonzero"),
        ("bool-mask", lambda: T[T > 0], "aten::index(bool mask)"),
        ("inside-custom-op", lambda: torch.ops.dgg_test.syncs_inside(T), "aten::item"),
    ],
)
@pytest.mark.parametrize("device", ["cpu", None], ids=["cpu", "default"])
def test_catches(name, fn, expected, device):
    with record_syncs(device) as rec:
        fn()
    assert rec.events == [expected], rec.events


def test_print_is_one_event(capsys):
    with record_syncs("cpu") as rec:
        print(T)
    assert rec.events == ["print (__repr__)"]
    assert "tensor" in capsys.readouterr().out


def test_device_side_code_is_not_flagged():
    with record_syncs("cpu") as rec:
        x = T * 2
        y = torch.where(x > 1, x, torch.zeros_like(x))
        y.to(T.device)  # the device-agnostic idiom (a no-op on a GPU when T lives there)
        y.to(torch.float64)
        from dgg_fused import grad_sumsq

        grad_sumsq([x, y])
    assert rec.events == []


def test_patches_are_undone_after_the_block():
    before = (torch.Tensor.cpu, torch.Tensor.to, torch.Tensor.__repr__, torch.Tensor.tolist)
    with record_syncs("cpu"):
        pass
    assert (torch.Tensor.cpu, torch.Tensor.to, torch.Tensor.__repr__, torch.Tensor.tolist) == before
