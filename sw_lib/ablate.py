"""Zero or scale chosen scalar weights, and put them back bit-exactly.

A `WeightEdit` names one scalar by (layer, row, column[, expert | shared]) and what to do with
it (multiply by `scale`; 0.0 zeroes). `edited(model, edits)` is a context manager that applies
the edits and restores the saved original values on exit, exceptions included. Because the
originals are copied element by element and written back, restore is bit-exact in any dtype.

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
from dataclasses import asdict, dataclass
from typing import Iterable, Iterator

import torch
from torch import nn

from . import arch


@dataclass(frozen=True, order=True)
class WeightEdit:
    layer: int
    row: int
    column: int
    expert: int | None = None
    shared: bool = False
    scale: float = 0.0

    def key(self) -> tuple:
        """A canonical, hashable description (used in cache keys)."""
        return (self.layer, self.row, self.column, self.expert, self.shared, float(self.scale))

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict, scale: float | None = None) -> "WeightEdit":
        return cls(layer=int(d["layer"]), row=int(d["row"]), column=int(d["column"]),
                   expert=None if d.get("expert") is None else int(d["expert"]),
                   shared=bool(d.get("shared", False)),
                   scale=float(d.get("scale", 0.0) if scale is None else scale))


def weight_label(w: dict | WeightEdit) -> str:
    """`L{layer} [{row}, {column}]`, with `E{expert}` (or `shared`) for expert weights."""
    get = w.get if isinstance(w, dict) else lambda k, d=None: getattr(w, k, d)
    where = f"L{get('layer')}"
    if get("shared", False):
        where += " shared"
    elif get("expert") is not None:
        where += f" E{get('expert')}"
    return f"{where} [{get('row')}, {get('column')}]"


def zero(coords: Iterable) -> list[WeightEdit]:
    """WeightEdits that zero each coordinate (dicts, WeightEdits or (layer, row, column) tuples)."""
    return [_as_edit(c, 0.0) for c in coords]


def scale(coords: Iterable, factor: float) -> list[WeightEdit]:
    return [_as_edit(c, factor) for c in coords]


def _as_edit(c, factor: float) -> WeightEdit:
    if isinstance(c, WeightEdit):
        return WeightEdit(c.layer, c.row, c.column, c.expert, c.shared, factor)
    if isinstance(c, dict):
        return WeightEdit.from_dict(c, scale=factor)
    layer, row, column, *rest = c
    return WeightEdit(int(layer), int(row), int(column), rest[0] if rest else None, scale=factor)


def edits_key(edits: Iterable[WeightEdit]) -> tuple:
    """Order-independent key of a set of edits (the empty tuple is the unmodified model)."""
    return tuple(sorted(e.key() for e in edits))


def _check_bounds(matrix: torch.Tensor, e: WeightEdit) -> None:
    rows, cols = matrix.shape
    if not (0 <= e.row < rows and 0 <= e.column < cols):
        raise IndexError(f"weight edit {e} is outside the [{rows}, {cols}] matrix of layer {e.layer}")


# --- ledger of the weights' state -----------------------------------------------------------


@dataclass
class _Block:
    edits: list[WeightEdit] | None  # None: a change no WeightEdit describes (skipped experts)
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


def outside_edits(model: nn.Module) -> list[WeightEdit] | None:
    """The edits of the `edited` blocks active around the caller, when they explain every
    in-place change since `mark_unmodified`; None when a weight changed some other way."""
    ledger = model.__dict__.get("_sw_ledger")
    if ledger is None or any(block.edits is None for block in ledger.blocks):
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


def active_edits(model: nn.Module) -> list[WeightEdit]:
    """The edits of every `edited` block active now, outermost first."""
    ledger = model.__dict__.get("_sw_ledger")
    return [e for block in ledger.blocks for e in block.edits or []] if ledger else []


def _enter(model: nn.Module, edits: list[WeightEdit] | None, before: dict[int, int],
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
def edited(model: nn.Module, edits: Iterable[WeightEdit]) -> Iterator[list[WeightEdit]]:
    """Apply `edits` inside the block; restore every touched scalar exactly on exit.

    The block is recorded in the model's ledger while active (see `outside_edits`)."""
    edits = list(edits)
    saved: list[tuple[torch.Tensor, int, int, torch.Tensor]] = []
    matrices: dict[int, torch.Tensor] = {}
    before: dict[int, int] = {}
    block = None
    try:
        with torch.no_grad():
            for e in edits:
                matrix = arch.weight_matrix(model, e.layer, e.expert, e.shared)
                _check_bounds(matrix, e)
                base = _base(matrix)
                matrices.setdefault(id(base), base)
                before.setdefault(id(base), base._version)
                original = matrix[e.row, e.column].clone()
                saved.append((matrix, e.row, e.column, original))
                matrix[e.row, e.column] = original * e.scale if e.scale != 0.0 else 0.0
        block = _enter(model, edits, before, matrices)
        yield edits
    finally:
        at_exit = {k: t._version for k, t in matrices.items()}
        with torch.no_grad():
            # Reverse order so a scalar edited twice ends at its first saved (true) value.
            for matrix, row, column, original in reversed(saved):
                matrix[row, column] = original
        _leave(model, block, matrices, at_exit)


@contextlib.contextmanager
def zeroed(model: nn.Module, coords: Iterable) -> Iterator[list[WeightEdit]]:
    """Shorthand: zero the given coordinates inside the block."""
    with edited(model, zero(coords)) as edits:
        yield edits


@contextlib.contextmanager
def experts_skipped(model: nn.Module, experts: Iterable) -> Iterator[None]:
    """Zero whole experts' down projections, so they contribute nothing; restore bit-exactly.

    Each expert is a (layer, expert) pair or a {"layer", "expert", "shared"} dict; a shared
    expert ({"shared": True}) has its dense down projection zeroed.
    """
    saved = []
    matrices: dict[int, torch.Tensor] = {}
    before: dict[int, int] = {}
    block = None
    try:
        with torch.no_grad():
            for e in experts:
                layer, expert, shared = ((e["layer"], e.get("expert"), e.get("shared", False))
                                         if isinstance(e, dict) else (*e, False))
                # The [row, column] matrix of an expert (or of the shared expert) is a view:
                # zeroing it zeroes the slice inside the fused tensor.
                matrix = arch.weight_matrix(model, layer, expert, shared)
                base = _base(matrix)
                matrices.setdefault(id(base), base)
                before.setdefault(id(base), base._version)
                saved.append((matrix, matrix.clone()))
                matrix.zero_()
        # In the ledger as a change no WeightEdit describes: evaluations inside re-fingerprint.
        block = _enter(model, None, before, matrices)
        yield
    finally:
        at_exit = {k: t._version for k, t in matrices.items()}
        with torch.no_grad():
            for matrix, original in reversed(saved):
                matrix.copy_(original)
        _leave(model, block, matrices, at_exit)
