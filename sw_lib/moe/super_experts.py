"""Super experts (Su et al. 2025, arXiv 2507.23279): the few experts whose down projection
writes the huge activations.

Each expert's (shared ones included) maximum |down_proj output| over the analysed texts; an
expert is a super expert when its maximum exceeds both the 99.5th percentile of all experts'
maxima and a tenth of the global maximum, in the first 75% of layers (where the super
activation forms).
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


def flag_super_experts(maxima: list[dict], num_layers: int, percentile: float = 99.5,
                       global_fraction: float = 0.1, layer_fraction: float = 0.75) -> dict:
    """Apply the super-expert rule to `ExpertMaxima.to_list()` output.

    Only experts that processed at least one token count towards the percentile (an unused
    expert has no maximum). Returns both thresholds and the flagged experts (largest first).
    """
    used = [m for m in maxima if m["tokens"] > 0]
    values = np.array([m["max_output"] for m in used], dtype=np.float64)
    percentile_threshold = float(np.percentile(values, percentile)) if values.size else None
    global_max = float(values.max()) if values.size else None
    global_threshold = global_fraction * global_max if values.size else None
    layer_limit = layer_fraction * num_layers
    flagged = [m for m in used
               if m["max_output"] > percentile_threshold and m["max_output"] > global_threshold
               and m["layer"] < layer_limit]
    return {
        "percentile": percentile,
        "percentile_threshold": percentile_threshold,
        "global_fraction": global_fraction,
        "global_max": global_max,
        "global_threshold": global_threshold,
        "layer_fraction": layer_fraction,
        "layer_limit": layer_limit,  # layers with index < layer_limit may hold super experts
        "flagged": sorted(flagged, key=lambda m: -m["max_output"]),
    }
