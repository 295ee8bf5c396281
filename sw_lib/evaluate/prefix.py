"""Start an ablated forward pass at the ablated layer (DESIGN section 7).

Edits at layer L (and above) leave every hidden state below layer L unchanged. So the output
of layer L - 1 for a batch, recorded once, serves every later condition whose lowest edited
layer is L: layers 0..L-1 are not run again; they hand on the recorded output instead.

The recorded states live in a `LayerStates` object that the caller owns and passes in (the
evaluation engine keeps one per `EvalCache`, next to the results on disk); nothing is kept
in module globals. For one condition the engine makes a `Plan`: the store, the weights'
fingerprint, the lowest edited layer, and the layers whose inputs to record (`keep_layers`,
e.g. the detected super weights' layers while the baseline runs, plus the lowest edited layer
of the condition itself). `run_decoder(model, plan, ...)` then reuses or records per batch,
keyed by (fingerprint, batch contents, layer); a batch never seen before simply runs in full.
Results are identical either way: the recorded states are the tensors the skipped layers would
compute. The layer swapping itself is `sw_lib.prefix`.
"""
from __future__ import annotations

import hashlib
from collections import OrderedDict
from dataclasses import dataclass
from typing import Iterable

import torch
from torch import nn

from .. import prefix
from ..edits import first_layer

DEFAULT_BUDGET = 2 << 30  # bytes of hidden states kept per store


def decoder(model: nn.Module) -> nn.Module:
    """The causal LM's base model (embeddings + layers + final norm, no LM head)."""
    return getattr(model, model.base_model_prefix)


class LayerStates:
    """Recorded layer inputs by (fingerprint, batch digest, layer), oldest dropped first."""

    def __init__(self, budget_bytes: int = DEFAULT_BUDGET):
        self.budget = budget_bytes
        self.states: OrderedDict[tuple, object] = OrderedDict()
        self.bytes = 0
        self.reused = 0  # batches that skipped layers (for tests and reports)

    def get(self, key: tuple):
        state = self.states.get(key)
        if state is not None:
            self.states.move_to_end(key)
        return state

    def put(self, key: tuple, state) -> None:
        size = _nbytes(state)
        if size > self.budget or key in self.states:
            return
        while self.bytes + size > self.budget:
            _, old = self.states.popitem(last=False)
            self.bytes -= _nbytes(old)
        self.states[key] = state
        self.bytes += size

    def clear(self) -> None:
        self.states.clear()
        self.bytes = 0


@dataclass(frozen=True)
class Plan:
    """How the forward passes of one condition use `states`."""

    states: LayerStates
    fingerprint: str
    start: int | None  # lowest edited layer (None: no edits)
    record: tuple[int, ...]  # layers whose inputs to keep


def make_plan(states: LayerStates | None, fingerprint: str, edits: Iterable,
              keep_layers: Iterable[int] = ()) -> Plan | None:
    """The plan of a condition with `edits` (None when there is no store or nothing to do)."""
    if states is None:
        return None
    start = first_layer(edits)
    record = set(int(x) for x in keep_layers) | ({start} if start else set())
    # Below the lowest edit only: higher layers' inputs already carry the edits' effects.
    record = tuple(sorted(x for x in record if x >= 1 and (start is None or x <= start)))
    if not start and not record:
        return None
    return Plan(states, fingerprint, start, record)


def _nbytes(state) -> int:
    if isinstance(state, torch.Tensor):
        return state.numel() * state.element_size()
    return sum(_nbytes(s) for s in state) if isinstance(state, (tuple, list)) else 0


def batch_digest(inputs: dict) -> str:
    h = hashlib.blake2b(digest_size=16)
    for name in sorted(inputs):
        value = inputs[name]
        if isinstance(value, torch.Tensor):
            t = value.detach().to("cpu").contiguous()
            h.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
            h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def run_prompt(model: nn.Module, plan: Plan | None, input_ids: torch.Tensor, cache) -> torch.Tensor:
    """The last hidden states of one prompt encoded into `cache` (an empty key/value cache).

    For generation the layers below an edit must also leave their keys and values in the
    cache (later tokens attend to them), so a kept entry is (the input of layer L, the keys and
    values of layers 0..L-1); a reusing pass writes those into the cache in place of running
    the layers."""
    base = decoder(model)
    if plan is None:
        return base(input_ids=input_ids, cache=cache, use_cache=True).last_hidden_state
    digest = "prompt:" + batch_digest({"input_ids": input_ids})
    if plan.start:
        kept = plan.states.get((plan.fingerprint, digest, plan.start))
        if kept is not None:
            state, kv = kept
            plan.states.reused += 1
            fill = lambda i: cache.update(kv[i][0], kv[i][1], i)  # noqa: E731
            with prefix.starting_at(model, plan.start, state, on_skip=fill):
                return base(input_ids=input_ids, cache=cache, use_cache=True).last_hidden_state
    with prefix.recording_inputs(model, plan.record) as captured:
        hidden = base(input_ids=input_ids, cache=cache, use_cache=True).last_hidden_state
    for layer, state in captured.items():
        kv = [(cache.layers[i].keys, cache.layers[i].values) for i in range(layer)]
        plan.states.put((plan.fingerprint, digest, layer), (state, kv))
    return hidden


def run_decoder(model: nn.Module, plan: Plan | None, key: str = "", **inputs) -> torch.Tensor:
    """The decoder's last hidden states, reusing / recording layer inputs as `plan` says.

    Recordings are keyed by the tensors in `inputs` and by `key`, which names whatever else
    the layer inputs depend on (the tokens of a key/value cache passed in)."""
    base = decoder(model)
    if plan is None:
        return base(**inputs).last_hidden_state
    digest = batch_digest(inputs) + key
    if plan.start:
        state = plan.states.get((plan.fingerprint, digest, plan.start))
        if state is not None:
            plan.states.reused += 1
            with prefix.starting_at(model, plan.start, state):
                return base(**inputs).last_hidden_state
    with prefix.recording_inputs(model, plan.record) as captured:
        hidden = base(**inputs).last_hidden_state
    for layer, state in captured.items():
        plan.states.put((plan.fingerprint, digest, layer), state)
    return hidden
