"""Apply edits to a model and put every weight back bit-exactly.

`edited(model, edits)` applies any mix of edits (`sw_lib.edits`: scalar `WeightEdit`s, whole
`ExpertSkip`s, and the kinds added there) inside a block and restores them on exit, exceptions
included. Scalars are copied element by element and written back, other kinds undo themselves
(`applied`), so restore is bit-exact in any dtype.

The model keeps a ledger of its weights (`mark_unmodified`, `outside_edits`): the in-place
version counter at which each tensor holds its fingerprinted values, and the `edited` blocks
active now. An evaluation run inside a caller's own `edited`/`zeroed` block can so tell that
the weights it sees are the fingerprinted ones plus those edits, and anything else that wrote
to a weight in place (a raw `W[r, c] = 0` under no_grad) shows as an unexplained version
change. Writes through `tensor.data` bypass version counters (a PyTorch rule) and stay
invisible; edit weights through this module or in-place tensor operations.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Iterable, Iterator

import torch
from torch import nn

from . import arch
from .edits import ExpertSkip, WeightEdit, edits_key, scale, skip, zero  # noqa: F401 (re-exported)


def weight_label(w: dict | WeightEdit) -> str:
    """`L{layer} [{row}, {column}]`, with `E{expert}` (or `shared`) for expert weights."""
    get = w.get if isinstance(w, dict) else lambda k, d=None: getattr(w, k, d)
    where = f"L{get('layer')}"
    if get("shared", False):
        where += " shared"
    elif get("expert") is not None:
        where += f" E{get('expert')}"
    return f"{where} [{get('row')}, {get('column')}]"


def _check_bounds(matrix: torch.Tensor, e: WeightEdit) -> None:
    rows, cols = matrix.shape
    if not (0 <= e.row < rows and 0 <= e.column < cols):
        raise IndexError(f"weight edit {e} is outside the [{rows}, {cols}] matrix of layer {e.layer}")


# --- ledger of the weights' state -----------------------------------------------------------


@dataclass
class _Block:
    edits: list  # the block's edits (every kind describes itself, so it can join a cache key)
    versions: dict[int, list[int]]  # id(tensor) -> [version before the edits, version after]


@dataclass
class _Ledger:
    clean: dict[int, int]  # id(tensor) -> version at which it holds its fingerprinted values
    blocks: list[_Block]  # active `edited` blocks, outermost first


def _tensors(model: nn.Module) -> list[torch.Tensor]:
    return list(model.parameters()) + list(model.buffers())


def _base(t: torch.Tensor) -> torch.Tensor:
    """The tensor a view was taken from (views share its version counter)."""
    while t._base is not None:
        t = t._base
    return t


def mark_unmodified(model: nn.Module) -> None:
    """Record that every weight now holds the values its fingerprint was computed from."""
    blocks = model.__dict__.get("_sw_ledger", _Ledger({}, [])).blocks
    model.__dict__["_sw_ledger"] = _Ledger({id(t): t._version for t in _tensors(model)}, blocks)


def outside_edits(model: nn.Module) -> list | None:
    """The edits of the `edited` blocks active around the caller, when they explain every
    in-place change since `mark_unmodified`; None when a weight changed some other way."""
    ledger = model.__dict__.get("_sw_ledger")
    if ledger is None:
        return None
    for t in _tensors(model):
        expected = ledger.clean.get(id(t))
        for block in ledger.blocks:
            before_after = block.versions.get(id(t))
            if before_after is not None:
                if before_after[0] != expected:
                    return None
                expected = before_after[1]
        if expected is None or t._version != expected:
            return None
    return [e for block in ledger.blocks for e in block.edits]


def active_edits(model: nn.Module) -> list:
    """The edits of every `edited` block active now, outermost first."""
    ledger = model.__dict__.get("_sw_ledger")
    return [e for block in ledger.blocks for e in block.edits] if ledger else []


def _enter(model: nn.Module, edits: list, before: dict[int, int],
           matrices: dict[int, torch.Tensor]) -> _Block | None:
    ledger = model.__dict__.get("_sw_ledger")
    if ledger is None:
        return None
    block = _Block(edits, {k: [v, matrices[k]._version] for k, v in before.items()})
    ledger.blocks.append(block)
    return block


def _leave(model: nn.Module, block: _Block | None, matrices: dict[int, torch.Tensor],
           at_exit: dict[int, int]) -> None:
    """After a bit-exact restore the weights are as before the block: the restored version
    stands for that state (unless something else wrote to the tensor meanwhile)."""
    ledger = model.__dict__.get("_sw_ledger")
    if ledger is None or block is None or block not in ledger.blocks:
        return
    index = ledger.blocks.index(block)
    ledger.blocks.pop(index)
    for key, (before, after) in block.versions.items():
        if at_exit[key] != after:
            continue  # written meanwhile: the state stays unexplained
        restored = matrices[key]._version
        outer = [b for b in ledger.blocks[:index] if key in b.versions]
        if outer and outer[-1].versions[key][1] == before:
            outer[-1].versions[key][1] = restored
        elif not outer and ledger.clean.get(key) == before:
            ledger.clean[key] = restored


@contextlib.contextmanager
def edited(model: nn.Module, edits: Iterable) -> Iterator[list]:
    """Apply `edits` (any kinds) inside the block; restore every touched weight exactly on exit.

    The block is recorded in the model's ledger while active (see `outside_edits`)."""
    edits = list(edits)
    saved: list[tuple[torch.Tensor, int, int, torch.Tensor]] = []
    matrices: dict[int, torch.Tensor] = {}
    before: dict[int, int] = {}

    def watch(tensor: torch.Tensor) -> None:  # its version before this block's first write
        base = _base(tensor)
        matrices.setdefault(id(base), base)
        before.setdefault(id(base), base._version)

    block = None
    with contextlib.ExitStack() as undo:
        try:
            with torch.no_grad():
                for e in edits:
                    for tensor in e.targets(model):
                        watch(tensor)
                    if isinstance(e, WeightEdit):
                        matrix = arch.weight_matrix(model, e.layer, e.expert, e.shared)
                        _check_bounds(matrix, e)
                        original = matrix[e.row, e.column].clone()
                        saved.append((matrix, e.row, e.column, original))
                        matrix[e.row, e.column] = original * e.scale if e.scale != 0.0 else 0.0
                    else:
                        undo.enter_context(e.applied(model))
            block = _enter(model, edits, before, matrices)
            yield edits
        finally:
            at_exit = {k: t._version for k, t in matrices.items()}
            with torch.no_grad():
                # Reverse order so a scalar edited twice ends at its first saved (true) value.
                for matrix, row, column, original in reversed(saved):
                    matrix[row, column] = original
            undo.close()  # the other kinds undo themselves, last applied first
            _leave(model, block, matrices, at_exit)


@contextlib.contextmanager
def zeroed(model: nn.Module, coords: Iterable) -> Iterator[list[WeightEdit]]:
    """Shorthand: zero the given coordinates inside the block."""
    with edited(model, zero(coords)) as applied:
        yield applied


@contextlib.contextmanager
def experts_skipped(model: nn.Module, experts: Iterable) -> Iterator[list[ExpertSkip]]:
    """Shorthand: skip whole experts inside the block ((layer, expert) pairs, {"layer",
    "expert", "shared"} dicts or ExpertSkips; a shared expert has its down projection zeroed)."""
    with edited(model, skip(experts)) as applied:
        yield applied
