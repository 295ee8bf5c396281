"""Reuse the unchanged prefix of a forward pass.

Zeroing a weight in layer L leaves every hidden state before layer L unchanged. So: record the
input of layer L once on the unmodified model, then, for an edit at layer L, let layers
0..L-1 hand on that recording instead of computing, and run only layers L.. and the head.
Works for every family in `arch`, since it swaps whole decoder layers and never looks inside.
Used by detection (confirming candidates) and by the evaluation engine (ablated conditions).
"""
from __future__ import annotations

import contextlib
from typing import Callable, Iterable, Iterator

from torch import nn

from . import arch


def clone(state):
    """A detached copy of a layer output (a tensor or a tuple holding tensors)."""
    if hasattr(state, "detach"):
        return state.detach().clone()
    if isinstance(state, tuple):
        return tuple(clone(s) for s in state)
    return state


@contextlib.contextmanager
def recording_inputs(model: nn.Module, layers: Iterable[int]) -> Iterator[dict[int, object]]:
    """Inside the block, forward passes record the input of each layer in `layers` (>= 1):
    the output of the layer before it, as a detached copy, in the yielded dict."""
    decoder_layers = arch.decoder_layers(model)
    captured: dict[int, object] = {}

    def keep(layer):
        return lambda module, args, output: captured.__setitem__(layer, clone(output))

    handles = [decoder_layers[layer - 1].register_forward_hook(keep(layer))
               for layer in sorted(set(layers)) if layer >= 1]
    try:
        yield captured
    finally:
        for handle in handles:
            handle.remove()


@contextlib.contextmanager
def starting_at(model: nn.Module, layer: int, state,
                on_skip: Callable[[int], None] | None = None) -> Iterator[None]:
    """Forward passes inside start at `layer`: the layers before it return `state`, the
    recorded input of `layer` (a fresh copy per call). Only valid for the inputs the state was
    recorded with, and for edits at `layer` or above. `layer` 0 changes nothing.
    on_skip(i) runs in place of each skipped layer i (e.g. to fill its key/value cache)."""
    skipped = list(arch.decoder_layers(model))[:layer]

    def replay(index):
        def forward(*args, **kwargs):
            if on_skip is not None:
                on_skip(index)
            return clone(state)
        return forward

    try:
        for index, module in enumerate(skipped):
            module.forward = replay(index)
        yield
    finally:
        for module in skipped:
            del module.forward  # the class's forward is visible again
