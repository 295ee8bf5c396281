"""Super experts (Su et al. 2025, arXiv 2507.23279): the few experts whose down projection
writes the huge activations, by the rule of the reference code (ZunhaiSu/Super-Experts-Profilling,
`eval_utils.py`: `_super_experts_analysis` and `_identify_super_experts`).

Each expert's (shared ones included) maximum |down_proj output| over the calibration tokens.
The population is every expert that processed a token in the layers below
L' = round(0.75 * num_layers) (Python's round, as the reference: where the super activation
forms); over that population only, the 99.5th percentile (numpy's linear interpolation) and
max // 10 (floor division of the largest peak, as the reference writes "a tenth of the
maximum"); a super expert is a member above both. Computing the thresholds over all layers
instead lets a huge final-layer expert raise the bar and hide the real ones.

Where this differs from the reference code, and why: its hook reads `output[0]` of each
per-expert down projection, which for routed experts (2-D [routed tokens, H] inputs) is only
the first routed token's row; we take the largest |value| over every routed token, the peak the
paper describes. An expert never routed a calibration token has no peak and is left out (the
reference has no value for it either).
"""
from __future__ import annotations

import numpy as np
import torch

from .capture import MoELayerPass


def peak(values: torch.Tensor) -> tuple[float, int, int]:
    """(max |value|, row index, column index) of a 2-D tensor."""
    flat = int(values.abs().argmax())
    row, column = divmod(flat, values.shape[1])
    return float(values[row, column].abs()), row, column


class ExpertMaxima:
    """Accumulates each expert's largest |down_proj input| and |output| over forward passes."""

    def __init__(self) -> None:
        self.records: dict[tuple[int, int | None, bool], dict] = {}
        self._offset: dict[int, int] = {}  # tokens seen per layer in earlier passes

    def _update(self, layer: int, expert: int | None, shared: bool, tokens: torch.Tensor,
                inner: torch.Tensor, out: torch.Tensor, seq_len: int, offset: int) -> None:
        key = (layer, expert, shared)
        record = self.records.setdefault(key, {
            "layer": layer, "expert": expert, "shared": shared, "tokens": 0,
            "max_output": 0.0, "output_channel": None, "output_text": None,
            "output_position": None, "max_input": 0.0, "input_channel": None})
        record["tokens"] += int(tokens.numel())
        if tokens.numel() == 0:
            return
        out_value, out_i, out_channel = peak(out)
        if out_value > record["max_output"]:
            text, position = divmod(offset + int(tokens[out_i]), seq_len)
            record.update(max_output=out_value, output_channel=out_channel, output_text=text,
                          output_position=position)
        in_value, _, in_channel = peak(inner)
        if in_value > record["max_input"]:
            record.update(max_input=in_value, input_channel=in_channel)

    def __call__(self, p: MoELayerPass) -> None:
        offset = self._offset.get(p.layer, 0)
        for expert in range(p.num_experts):
            tokens, inner, out = p.expert_activations(expert)
            self._update(p.layer, expert, False, tokens, inner, out, p.seq_len, offset)
        if p.shared_input is not None:
            inner, out = p.shared_activations()
            tokens = torch.arange(p.num_tokens, device=inner.device)
            self._update(p.layer, None, True, tokens, inner, out, p.seq_len, offset)
        self._offset[p.layer] = offset + p.num_tokens

    def to_list(self) -> list[dict]:
        """Per (layer, expert): tokens processed, max |output| (channel = row, text, position)
        and max |input| (channel = column); routed experts first, then the shared one."""
        def order(r: dict) -> tuple:
            return r["layer"], r["shared"], -1 if r["expert"] is None else r["expert"]

        return [dict(r) for r in sorted(self.records.values(), key=order)]


PERCENTILE = 99.5  # the reference's quantile
GLOBAL_DIVISOR = 10  # threshold = max // GLOBAL_DIVISOR (the reference's `np.max(...) // times`)
LAYER_FRACTION = 0.75  # the reference's include_layers
RULE = ("Su et al. 2025 (arXiv 2507.23279), rule of ZunhaiSu/Super-Experts-Profilling: over the "
        "experts that processed a calibration token in layers < round(0.75 * num_layers), an "
        "expert is a super expert when its max |down_proj output| exceeds both the 99.5th "
        "percentile of their maxima and max // 10")


def layer_limit(num_layers: int, fraction: float = LAYER_FRACTION) -> int:
    """round(fraction * num_layers): experts of layers below it may be super experts."""
    return round(fraction * num_layers)


def flag_super_experts(maxima: list[dict], num_layers: int) -> dict:
    """Apply the reference rule to `ExpertMaxima.to_list()` output (module docstring).

    Returns the rule's numbers and the flagged experts (largest first): {"rule", "percentile",
    "percentile_threshold", "global_divisor", "global_max", "global_threshold", "layer_fraction",
    "layer_limit", "population": {"experts", "layers"}, "flagged"}; thresholds are None when no
    expert qualifies for the population.
    """
    limit = layer_limit(num_layers)
    population = [m for m in maxima if m["tokens"] > 0 and m["layer"] < limit]
    values = np.array([m["max_output"] for m in population], dtype=np.float64)
    percentile_threshold = global_max = global_threshold = None
    flagged: list[dict] = []
    if values.size:
        percentile_threshold = float(np.percentile(values, PERCENTILE))
        global_max = float(values.max())
        global_threshold = float(global_max // GLOBAL_DIVISOR)
        flagged = [m for m in population
                   if m["max_output"] > percentile_threshold and m["max_output"] > global_threshold]
    return {
        "rule": RULE,
        "percentile": PERCENTILE,
        "percentile_threshold": percentile_threshold,
        "global_divisor": GLOBAL_DIVISOR,
        "global_max": global_max,
        "global_threshold": global_threshold,
        "layer_fraction": LAYER_FRACTION,
        "layer_limit": limit,  # layers with index < layer_limit make the population
        "population": {"experts": len(population),
                       "layers": sorted({m["layer"] for m in population})},
        "flagged": sorted(flagged, key=lambda m: -m["max_output"]),
    }
