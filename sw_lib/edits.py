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

from . import arch, hooks, quantize


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


# --- the paper's experiments beyond zeroing (notebooks 06 and 07) -----------------------------


@register
@dataclass(frozen=True)
class ActivationRestore:
    """Put a super activation back: where the down projection of `layer` writes residual
    channel `row`, the output is set to what the unedited weights would give at every position
    whose original |value| reaches `min_value` (the super activation's tokens), through a
    forward hook. Pair it with the edit that zeroes (or scales) the super weights
    [row, columns] of that layer: the paper's restore experiment.

    The original output is exact algebra, not a recording: it differs from the edited one only
    by (original - current weight) x input of each column, and the input of the layer's own
    down projection is unchanged by edits at that layer. `values`: the super weights' original
    values, in the order of `columns`. Dense down projections only."""

    layer: int
    row: int
    columns: tuple[int, ...]
    values: tuple[float, ...]
    min_value: float

    kind = "activation_restore"

    def __post_init__(self):
        if len(self.columns) != len(self.values) or not self.columns:
            raise ValueError(f"an activation restore needs one original value per column, got "
                             f"columns={self.columns}, values={self.values}")

    def key(self) -> tuple:
        return (self.kind, self.layer, self.row, tuple(self.columns),
                tuple(float(v) for v in self.values), float(self.min_value))

    @property
    def first_layer(self) -> int:
        return self.layer

    def targets(self, model: nn.Module) -> list[torch.Tensor]:
        return []  # a hook: no weight is written

    @contextlib.contextmanager
    def applied(self, model: nn.Module) -> Iterator[None]:
        matrix = arch.down_proj_matrix(model, self.layer)
        columns = torch.tensor(self.columns, device=matrix.device)
        original = torch.tensor(self.values, dtype=torch.float32, device=matrix.device)

        def restore(module, args, output):
            x = args[0]
            missing = original - matrix[self.row, columns].float()  # what the edits took away
            before = output[..., self.row].float() + (x[..., columns].float() * missing).sum(-1)
            where = before.abs() >= self.min_value
            output[..., self.row] = torch.where(where, before.to(output.dtype), output[..., self.row])
            return output

        with hooks.attached([(arch.down_proj(model, self.layer), restore)]):
            yield

    def to_dict(self) -> dict:
        return {"kind": self.kind, "layer": self.layer, "row": self.row,
                "columns": list(self.columns), "values": list(self.values),
                "min_value": self.min_value}

    @classmethod
    def from_dict(cls, d: dict) -> "ActivationRestore":
        return cls(int(d["layer"]), int(d["row"]), tuple(int(c) for c in d["columns"]),
                   tuple(float(v) for v in d["values"]), float(d["min_value"]))


def _coordinates(weights: Iterable) -> tuple[tuple, ...]:
    """(layer, row, column, expert, shared) of each weight (dicts or WeightEdits), sorted."""
    out = set()
    for w in weights:
        e = _as_weight_edit(w, 0.0)
        out.add((e.layer, e.row, e.column, e.expert, e.shared))
    return tuple(sorted(out, key=repr))


def decoder_matrices(model: nn.Module) -> list[torch.Tensor]:
    """Every weight of two or more dimensions inside the decoder layers: the linear layers
    (attention, MLP, routers, fused experts). Embeddings and the LM head lie outside them and
    stay in full precision, as in the paper's experiments."""
    return [p for layer in arch.decoder_layers(model) for name, p in layer.named_parameters()
            if name.endswith("weight") and p.dim() >= 2]


@register
@dataclass(frozen=True)
class WeightQuantization:
    """Every linear layer of the decoder quantized with round-to-nearest asymmetric INT`bits`
    in blocks of `block_size` elements (`sw_lib.quantize.blockwise`), simulated in the model's
    dtype. Naive: `clip_z` None and `keep` empty. Super-weight-aware (the paper): each block
    first clipped at mean |w| + clip_z * std |w|, and the weights of `keep` (layer, row,
    column, expert, shared) written back in full precision afterwards."""

    bits: int
    block_size: int | str
    clip_z: float | None = None
    keep: tuple[tuple, ...] = ()

    kind = "weight_quantization"

    def __post_init__(self):
        quantize.levels(self.bits)
        if self.block_size not in quantize.BLOCK_WORDS:
            quantize.block_length(self.block_size, torch.Size([1, 1]))
        if self.clip_z is not None and not self.clip_z > 0:
            raise ValueError(f"clip_z must be positive (or None: no clipping), got {self.clip_z}")

    @classmethod
    def naive(cls, bits: int, block_size: int | str) -> "WeightQuantization":
        return cls(bits, block_size)

    @classmethod
    def super_weight_aware(cls, bits: int, block_size: int | str, clip_z: float,
                           super_weights: Iterable) -> "WeightQuantization":
        return cls(bits, block_size, float(clip_z), _coordinates(super_weights))

    @property
    def variant(self) -> str:
        return "naive" if self.clip_z is None and not self.keep else "super_weight_aware"

    def key(self) -> tuple:
        return (self.kind, self.bits, self.block_size,
                None if self.clip_z is None else float(self.clip_z), self.keep)

    @property
    def first_layer(self) -> int:
        return 0

    def targets(self, model: nn.Module) -> list[torch.Tensor]:
        return decoder_matrices(model)

    @contextlib.contextmanager
    def applied(self, model: nn.Module) -> Iterator[None]:
        matrices = decoder_matrices(model)
        kept = [(arch.weight_matrix(model, layer, expert, shared), row, column)
                for layer, row, column, expert, shared in self.keep]
        full = [m[row, column].clone() for m, row, column in kept]
        originals = []
        try:
            with torch.no_grad():
                for weight in matrices:
                    originals.append(weight.detach().clone())
                    weight.copy_(quantize.blockwise(weight, self.bits, self.block_size,
                                                    self.clip_z))
                for (matrix, row, column), value in zip(kept, full):
                    matrix[row, column] = value
            yield
        finally:
            with torch.no_grad():
                for weight, original in zip(matrices, originals):
                    weight.copy_(original)

    def to_dict(self) -> dict:
        return {"kind": self.kind, "bits": self.bits, "block_size": self.block_size,
                "clip_z": self.clip_z, "variant": self.variant,
                "keep": [dict(zip(("layer", "row", "column", "expert", "shared"), k))
                         for k in self.keep]}

    @classmethod
    def from_dict(cls, d: dict) -> "WeightQuantization":
        return cls(int(d["bits"]), d["block_size"] if isinstance(d["block_size"], str)
                   else int(d["block_size"]),
                   None if d.get("clip_z") is None else float(d["clip_z"]),
                   _coordinates(d.get("keep", [])))


@register
@dataclass(frozen=True)
class ActivationQuantization:
    """The inputs of every dense down projection quantized per sequence with round-to-nearest
    asymmetric INT`bits` (`sw_lib.quantize.per_row_int`), through forward pre-hooks. `hold_out`
    (layer, column) pairs: in that layer, the largest |input| of that column in each sequence
    (the super activation that the super weight [., column] multiplies) is kept out of the
    range and passes unquantized, the paper's hold-out."""

    bits: int = 8
    hold_out: tuple[tuple[int, int], ...] = ()

    kind = "activation_quantization"

    def __post_init__(self):
        quantize.levels(self.bits)

    @property
    def variant(self) -> str:
        return "hold_out" if self.hold_out else "naive"

    def key(self) -> tuple:
        return (self.kind, self.bits, tuple(sorted(self.hold_out)))

    @property
    def first_layer(self) -> int:
        return 0

    def targets(self, model: nn.Module) -> list[torch.Tensor]:
        return []  # hooks: no weight is written

    def _hook(self, columns: list[int]):
        def quantize_input(module, args):
            x = args[0]
            hold = None
            if columns:
                hold = torch.zeros(x.shape, dtype=torch.bool, device=x.device)
                for column in columns:  # its largest |value| in each sequence
                    token = x[..., column].abs().argmax(dim=-1, keepdim=True)
                    hold[..., column].scatter_(-1, token, True)
            return (quantize.per_row_int(x, self.bits, hold), *args[1:])
        return quantize_input

    @contextlib.contextmanager
    def applied(self, model: nn.Module) -> Iterator[None]:
        pairs = [(arch.down_proj(model, layer),
                  self._hook([c for held, c in self.hold_out if held == layer]))
                 for layer in arch.dense_layers(model)]
        with hooks.attached(pairs, kind="pre"):
            yield

    def to_dict(self) -> dict:
        return {"kind": self.kind, "bits": self.bits, "variant": self.variant,
                "hold_out": [{"layer": layer, "column": column} for layer, column in self.hold_out]}

    @classmethod
    def from_dict(cls, d: dict) -> "ActivationQuantization":
        return cls(int(d.get("bits", 8)),
                   tuple(sorted((int(h["layer"]), int(h["column"])) for h in d.get("hold_out", []))))


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
