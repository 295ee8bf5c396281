"""Zero or scale chosen scalar weights, and put them back bit-exactly.

A `WeightEdit` names one scalar by (layer, row, column[, expert | shared]) and what to do with
it (multiply by `scale`; 0.0 zeroes). `edited(model, edits)` is a context manager that applies
the edits and restores the saved original values on exit, exceptions included. Because the
originals are copied element by element and written back, restore is bit-exact in any dtype.
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


@contextlib.contextmanager
def edited(model: nn.Module, edits: Iterable[WeightEdit]) -> Iterator[list[WeightEdit]]:
    """Apply `edits` inside the block; restore every touched scalar exactly on exit."""
    edits = list(edits)
    saved: list[tuple[torch.Tensor, int, int, torch.Tensor]] = []
    try:
        with torch.no_grad():
            for e in edits:
                matrix = arch.weight_matrix(model, e.layer, e.expert, e.shared)
                _check_bounds(matrix, e)
                original = matrix[e.row, e.column].clone()
                saved.append((matrix, e.row, e.column, original))
                matrix[e.row, e.column] = original * e.scale if e.scale != 0.0 else 0.0
        yield edits
    finally:
        with torch.no_grad():
            # Reverse order so a scalar edited twice ends at its first saved (true) value.
            for matrix, row, column, original in reversed(saved):
                matrix[row, column] = original


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
    try:
        with torch.no_grad():
            for e in experts:
                layer, expert, shared = ((e["layer"], e.get("expert"), e.get("shared", False))
                                         if isinstance(e, dict) else (*e, False))
                # The [row, column] matrix of an expert (or of the shared expert) is a view:
                # zeroing it zeroes the slice inside the fused tensor.
                matrix = arch.weight_matrix(model, layer, expert, shared)
                saved.append((matrix, matrix.clone()))
                matrix.zero_()
        yield
    finally:
        with torch.no_grad():
            for matrix, original in reversed(saved):
                matrix.copy_(original)
