"""When does an activation count as a spike? One threshold rule for dense and MoE detection.

- `absolute`: a reading spikes when its largest |value| exceeds `spike_threshold` (the seed's
  rule; 50 by default);
- `relative`: when it exceeds `relative_spike_factor` times the layer's median peak: each
  token's peak is its largest |value| over the channels, and the median is taken over the
  tokens of the layer's forward pass (for an MoE layer: over every (token, expert) pair the
  layer computed, shared expert included). MoE activation peaks are reported to be far lower
  than dense ones, so one absolute number cannot serve every model; a super activation is an
  outlier against the layer's own typical token.

The down projection's input and output are judged separately, each against its own median.
The detection JSONs record the rule (`to_dict`) and, per layer, the thresholds it gave.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from . import config

MODES = ("absolute", "relative")


@dataclass(frozen=True)
class SpikeThreshold:
    mode: str = config.default("detection.spike_threshold_mode")
    absolute: float = config.default("detection.spike_threshold")
    factor: float = config.default("detection.relative_spike_factor")

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"spike_threshold_mode must be one of {', '.join(MODES)}, got "
                             f"'{self.mode}'")
        if not self.absolute > 0 or not self.factor > 0:
            raise ValueError(f"spike_threshold and relative_spike_factor must be positive, got "
                             f"{self.absolute} and {self.factor}")

    def value(self, median_peak: float | None) -> float:
        """The threshold of one reading of one layer, whose tokens' median peak is given."""
        if self.mode == "absolute":
            return float(self.absolute)
        return float(self.factor * (median_peak or 0.0))

    def to_dict(self) -> dict:
        return {"spike_threshold_mode": self.mode, "spike_threshold": self.absolute,
                "relative_spike_factor": self.factor,
                "statement": ("a reading spikes above spike_threshold" if self.mode == "absolute"
                              else "a reading spikes above relative_spike_factor x the median "
                                   "over the layer's tokens of each token's largest |value|")}


def as_threshold(spike_threshold) -> SpikeThreshold:
    """A `SpikeThreshold` as given, or an absolute one from a number (the seed's form)."""
    if isinstance(spike_threshold, SpikeThreshold):
        return spike_threshold
    return SpikeThreshold("absolute", float(spike_threshold))


def token_peaks(values: torch.Tensor) -> torch.Tensor:
    """Each token's largest |value| over the channels of a [tokens, channels] tensor, float32."""
    return values.float().abs().amax(dim=-1)


def median_peak(peaks: torch.Tensor | list[torch.Tensor]) -> float | None:
    """The median of per-token peaks (pooled when a list); None when there is no token."""
    if isinstance(peaks, list):
        peaks = torch.cat([p.flatten() for p in peaks]) if peaks else torch.empty(0)
    if peaks.numel() == 0:
        return None
    return float(np.median(peaks.detach().double().cpu().numpy()))
