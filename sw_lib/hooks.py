"""Temporary forward hooks, removed reliably (one context manager for every module that reads
activations: detection, MoE capture, prefix reuse, tiny-model planting).

    with hooks.attached([(module, on_output)]):                 # forward hooks
        model(ids)
    with hooks.attached([(module, on_input)], kind="pre"):       # forward pre-hooks
        model(ids)

`kind` is "forward" (hook(module, args, output)), "pre" (hook(module, args)) or "forward_kwargs"
(hook(module, args, kwargs, output)). Every hook registered in the block is removed on exit,
exceptions included, and also when registering a later one fails.
"""
from __future__ import annotations

import contextlib
from typing import Callable, Iterable, Iterator

from torch import nn

KINDS = ("forward", "pre", "forward_kwargs")


def _register(module: nn.Module, hook: Callable, kind: str):
    if kind == "forward":
        return module.register_forward_hook(hook)
    if kind == "pre":
        return module.register_forward_pre_hook(hook)
    if kind == "forward_kwargs":
        return module.register_forward_hook(hook, with_kwargs=True)
    raise ValueError(f"unknown hook kind '{kind}'; use one of {', '.join(KINDS)}")


@contextlib.contextmanager
def attached(pairs: Iterable[tuple[nn.Module, Callable]], kind: str = "forward") -> Iterator[None]:
    """Register `hook` on `module` for each (module, hook) pair inside the block."""
    handles = []
    try:
        for module, hook in pairs:
            handles.append(_register(module, hook, kind))
        yield
    finally:
        for handle in handles:
            handle.remove()
