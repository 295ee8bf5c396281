"""Weights of a model that accelerate offloads (a `device_map` with "cpu" or "disk" places on a
GPU machine, "disk" on a CPU one): such a parameter sits on the meta device and a hook copies
it in from the hook's weights map before each forward pass. Edits must therefore go to the
weights map's tensor, which is what `parameter` returns; disk weights (read anew from their
memory-mapped file on every pass) are first pinned in the map's in-memory state, so an edit
persists and its bit-exact restore is what the next pass reads. The file is never written.
"""
from __future__ import annotations

import torch
from torch import nn


def is_offloaded(tensor: torch.Tensor) -> bool:
    return tensor.device.type == "meta"


def parameter(module: nn.Module, name: str, pin: bool = True) -> torch.Tensor:
    """`module.<name>` as the real tensor forward passes read (itself when not offloaded).
    pin=False: only read it (a disk weight is loaded, not pinned)."""
    tensor = getattr(module, name)
    if not is_offloaded(tensor):
        return tensor
    weights_map = getattr(getattr(module, "_hf_hook", None), "weights_map", None)
    if weights_map is None:
        raise ValueError(f"'{name}' of {type(module).__name__} is on the meta device and no "
                         "accelerate offload hook holds its values; load the model again")
    loader, key = weights_map.dataset, weights_map.prefix + name
    memory = getattr(loader, "state_dict", None)  # accelerate's OffloadedWeightsLoader
    if memory is None or key in memory or not pin:
        return loader[key]
    memory[key] = loader[key].clone()  # from the disk file: a private, writable copy
    return memory[key]


def state_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """model.state_dict() with every offloaded tensor replaced by its values (read only)."""
    state = model.state_dict()
    for full_name, tensor in state.items():
        if is_offloaded(tensor):
            owner, _, name = full_name.rpartition(".")
            state[full_name] = parameter(model.get_submodule(owner), name, pin=False)
    return state
