"""Every change an analysis makes to a model, under one protocol: an *edit*.

An edit says what it changes and how to undo it exactly, so that every consumer treats all
kinds alike: `ablate.edited(model, edits)` applies any mix and restores the weights bit-exactly,
the evaluation engine caches a condition under its edits' keys and starts each forward pass at
the lowest layer an edit changes, and the verdicts measure any edit set against a control.

The protocol (duck-typed; the kinds here and those added later follow it):

- `kind`: a short name ("weight", "expert_skip", ...), the first element of `key()`;
- `key()`: a canonical, hashable, JSON-able tuple (cache keys are built from it);
- `first_layer`: the lowest decoder layer whose computation the edit changes (layers below it
  see unchanged inputs, so their recorded outputs can be reused);
- `targets(model)`: the tensors the edit writes in place ([] for edits made with hooks), so the
  weights' ledger can tell such writes from foreign ones;
- `applied(model)`: a context manager that makes the change and undoes it exactly on exit;
  `WeightEdit` is the exception, applied by `ablate.edited` itself (many scalars, one pass);
- `to_dict()`: a JSON description with its "kind"; `from_dict` reads it back.
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
    """One scalar weight (layer, row, column[, expert | shared]) multiplied by `scale`
    (0.0 zeroes it). Row = output channel of the down projection, column = its input channel."""

    layer: int
    row: int
    column: int
    expert: int | None = None
    shared: bool = False
    scale: float = 0.0

    kind = "weight"

    def key(self) -> tuple:
        return (self.kind, self.layer, self.row, self.column, self.expert, self.shared,
                float(self.scale))

    @property
    def first_layer(self) -> int:
        return self.layer

    def targets(self, model: nn.Module) -> list[torch.Tensor]:
        return [arch.weight_matrix(model, self.layer, self.expert, self.shared)]

    def to_dict(self) -> dict:
        return {"kind": self.kind, **asdict(self)}

    @classmethod
    def from_dict(cls, d: dict, scale: float | None = None) -> "WeightEdit":
        return cls(layer=int(d["layer"]), row=int(d["row"]), column=int(d["column"]),
                   expert=None if d.get("expert") is None else int(d["expert"]),
                   shared=bool(d.get("shared", False)),
                   scale=float(d.get("scale", 0.0) if scale is None else scale))


@dataclass(frozen=True)
class ExpertSkip:
    """A whole expert contributes nothing: its down projection is zeroed (a routed expert of
    an MoE layer, or the layer's shared expert with `shared=True` and `expert=None`). Tokens
    routed to it keep their routing weights, as the super-expert ablations do."""

    layer: int
    expert: int | None = None
    shared: bool = False

    kind = "expert_skip"

    def __post_init__(self):
        if (self.expert is None) == (not self.shared):
            raise ValueError(f"an expert skip names a routed expert or the shared one, got "
                             f"expert={self.expert}, shared={self.shared}")

    def key(self) -> tuple:
        return (self.kind, self.layer, self.expert, self.shared)

    @property
    def first_layer(self) -> int:
        return self.layer

    def targets(self, model: nn.Module) -> list[torch.Tensor]:
        return [arch.weight_matrix(model, self.layer, self.expert, self.shared)]

    @contextlib.contextmanager
    def applied(self, model: nn.Module) -> Iterator[None]:
        # The expert's [row, column] matrix is a view: zeroing it zeroes the slice inside the
        # fused experts tensor; the copy puts every element back bit for bit.
        matrix = arch.weight_matrix(model, self.layer, self.expert, self.shared)
        original = matrix.detach().clone()
        try:
            with torch.no_grad():
                matrix.zero_()
            yield
        finally:
            with torch.no_grad():
                matrix.copy_(original)

    def to_dict(self) -> dict:
        return {"kind": self.kind, **asdict(self)}

    @classmethod
    def from_dict(cls, d: dict) -> "ExpertSkip":
        return cls(layer=int(d["layer"]),
                   expert=None if d.get("expert") is None else int(d["expert"]),
                   shared=bool(d.get("shared", False)))


# Every edit kind by name, for `from_dict` (later kinds register here).
KINDS: dict[str, type] = {WeightEdit.kind: WeightEdit, ExpertSkip.kind: ExpertSkip}


def register(cls: type) -> type:
    """Class decorator: make an edit kind readable by `from_dict`."""
    KINDS[cls.kind] = cls
    return cls


def from_dict(d: dict):
    """The edit a `to_dict()` describes (no "kind": a weight edit, as older JSON has it)."""
    kind = d.get("kind", WeightEdit.kind)
    if kind not in KINDS:
        raise ValueError(f"unknown edit kind '{kind}'; known kinds: {', '.join(sorted(KINDS))}")
    fields = {k: v for k, v in d.items() if k != "kind"}
    return KINDS[kind].from_dict(fields)


def edits_key(edits: Iterable) -> tuple:
    """Order-independent key of a set of edits (the empty tuple is the unmodified model)."""
    return tuple(sorted((e.key() for e in edits), key=repr))


def first_layer(edits: Iterable) -> int | None:
    """The lowest layer any of `edits` changes (None: no edits)."""
    layers = [e.first_layer for e in edits]
    return min(layers) if layers else None


@dataclass(frozen=True)
class EditSet:
    """A hashable set of edits, one condition of a model (verdicts measure these)."""

    edits: tuple = ()

    @classmethod
    def of(cls, edits: Iterable) -> "EditSet":
        return cls(tuple(sorted(edits, key=lambda e: repr(e.key()))))

    @classmethod
    def zeroing(cls, weights: Iterable) -> "EditSet":
        """Zero the given weights (dicts, WeightEdits or (layer, row, column) tuples)."""
        return cls.of(zero(weights))

    @classmethod
    def skipping(cls, experts: Iterable) -> "EditSet":
        """Skip whole experts: (layer, expert) pairs or {"layer", "expert", "shared"} dicts."""
        return cls.of(skip(experts))

    @property
    def first_layer(self) -> int:
        layer = first_layer(self.edits)
        if layer is None:
            raise ValueError("an empty edit set changes nothing")
        return layer

    def applied(self, model: nn.Module):
        from .ablate import edited

        return edited(model, self.edits)

    def key(self) -> tuple:
        return edits_key(self.edits)


# --- building edits ------------------------------------------------------------------------


def zero(coords: Iterable) -> list[WeightEdit]:
    """WeightEdits that zero each coordinate (dicts, WeightEdits or (layer, row, column) tuples)."""
    return [_as_weight_edit(c, 0.0) for c in coords]


def scale(coords: Iterable, factor: float) -> list[WeightEdit]:
    return [_as_weight_edit(c, factor) for c in coords]


def _as_weight_edit(c, factor: float) -> WeightEdit:
    if isinstance(c, WeightEdit):
        return WeightEdit(c.layer, c.row, c.column, c.expert, c.shared, factor)
    if isinstance(c, dict):
        return WeightEdit.from_dict(c, scale=factor)
    layer, row, column, *rest = c
    return WeightEdit(int(layer), int(row), int(column), rest[0] if rest else None, scale=factor)


def skip(experts: Iterable) -> list[ExpertSkip]:
    """ExpertSkips from (layer, expert) pairs, {"layer", "expert", "shared"} dicts or skips."""
    out = []
    for e in experts:
        if isinstance(e, ExpertSkip):
            out.append(e)
        elif isinstance(e, dict):
            out.append(ExpertSkip.from_dict(e))
        else:
            out.append(ExpertSkip(int(e[0]), None if e[1] is None else int(e[1]),
                                  e[1] is None))
    return out
