"""sw_lib.hooks: hooks see what they should and are gone after the block, errors included."""
import pytest
import torch
from torch import nn

from sw_lib import hooks


def _net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))


@pytest.mark.parametrize("kind", hooks.KINDS)
def test_hook_runs_inside_and_is_removed_after(kind):
    net, seen = _net(), []
    x = torch.randn(5, 3)
    record = {"forward": lambda m, a, o: seen.append(o.shape),
              "pre": lambda m, a: seen.append(a[0].shape),
              "forward_kwargs": lambda m, a, k, o: seen.append(o.shape)}[kind]
    with hooks.attached([(net[0], record), (net[2], record)], kind=kind):
        net(x)
    expected = ([(5, 3), (5, 4)] if kind == "pre" else [(5, 4), (5, 2)])
    assert [tuple(s) for s in seen] == expected
    net(x)
    assert len(seen) == 2  # nothing recorded once the block is left
    assert not net[0]._forward_hooks and not net[0]._forward_pre_hooks


def test_hooks_removed_when_the_block_raises():
    net = _net()
    with pytest.raises(RuntimeError):
        with hooks.attached([(net[0], lambda m, a, o: None)]):
            raise RuntimeError("boom")
    assert not net[0]._forward_hooks


def test_unknown_kind_is_refused_and_nothing_stays_registered():
    net = _net()
    with pytest.raises(ValueError, match="unknown hook kind"):
        with hooks.attached([(net[0], lambda *a: None)], kind="backward"):
            pass
    assert not net[0]._forward_hooks
