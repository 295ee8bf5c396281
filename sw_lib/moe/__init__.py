"""Mixture-of-experts analysis: routing statistics, super experts, expert super weights.

Modules: `capture` (hooks that read each expert's down-projection input and output in float32),
`routing` (p_active, routing weights and entropy, the sink token's routing), `super_experts`
(per-expert maxima and the super-expert rule), `super_weights` (expert super weight detection),
`causal` (loss ratios against random-expert controls), `texts` (bundled WikiText-2 texts),
`analysis` (the whole analysis as notebook 04's JSON).
"""
from __future__ import annotations

from .analysis import DEFAULT_PROMPT, SCHEMA, moe_analysis, route_texts
from .capture import MoELayerPass, capture_moe, run_batches
from .causal import experts_skipped, random_controls, reference_loss, score_super_experts, score_weights
from .routing import RoutingStats
from .super_experts import ExpertMaxima, flag_super_experts
from .super_weights import detect_expert_super_weights, expert_spikes, expert_super_weight_scan
from .texts import reference_ids, text_ids, wikitext_paragraphs

__all__ = [
    "DEFAULT_PROMPT", "SCHEMA", "ExpertMaxima", "MoELayerPass", "RoutingStats", "capture_moe",
    "detect_expert_super_weights", "expert_spikes", "expert_super_weight_scan", "experts_skipped",
    "flag_super_experts", "moe_analysis", "random_controls", "reference_ids", "reference_loss",
    "route_texts", "run_batches", "score_super_experts", "score_weights", "text_ids",
    "wikitext_paragraphs",
]
