"""Reuse the unchanged prefix of a forward pass.

Zeroing a weight in layer L leaves every hidden state before layer L unchanged. So: record each
decoder layer's output once on the unmodified model, then, for an edit at layer L, replace
layers 0..L-1 by their recorded outputs and compute only layers L.. and the head. Works for
every family in `arch`, since it swaps whole decoder layers and never looks inside them.
"""
from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from torch import nn

from . import arch


@torch.no_grad()
def record_layer_outputs(model: nn.Module, run) -> list:
    """Call `run()` (a forward pass) and return every decoder layer's output, in order."""
    layers = arch.decoder_layers(model)
    outputs: list = [None] * len(layers)

    def keep(i):
        def hook(module, args, output):
            outputs[i] = output
        return hook

    handles = [layer.register_forward_hook(keep(i)) for i, layer in enumerate(layers)]
    try:
        run()
    finally:
        for h in handles:
            h.remove()
    return outputs


@contextlib.contextmanager
def skip_layers(model: nn.Module, outputs: list, start: int) -> Iterator[None]:
    """Layers before `start` return their recorded outputs instead of computing them.

    Only valid for the same inputs as the recording, and for edits at layer >= start.
    """
    layers = arch.decoder_layers(model)
    patched = []
    try:
        for i in range(min(start, len(layers))):
            layer = layers[i]
            layer.forward = (lambda out: (lambda *args, **kwargs: out))(outputs[i])
            patched.append(layer)
        yield
    finally:
        for layer in patched:
            del layer.forward  # the class's forward is visible again
