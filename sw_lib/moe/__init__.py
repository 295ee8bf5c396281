"""Mixture-of-experts analysis: routing statistics, super experts, expert super weights, their
verdicts and the skip evaluation.

Modules: `capture` (hooks that read each expert's down-projection input and output in float32),
`texts` (the calibration texts and the verdicts' reference text), `routing` (p_active, routing
weights and entropy, the sink token's routing), `super_experts` (per-expert maxima and the
reference rule of Su et al.), `super_weights` (expert super weight detection), `controls`
(frequency-matched control experts), `verdicts` (verdicts with a control through
`sw_lib.verdict`), `skipping` (perplexity and accuracy with experts skipped, through
`sw_lib.study`), `analysis` (the whole analysis as notebook 04's document).

Imports flow one way: capture, texts <- routing, super_experts <- super_weights, controls <-
verdicts, skipping <- analysis. Nothing here imports `sw_lib.detect` (which imports this).
"""
from __future__ import annotations

from .analysis import SCHEMA, MoESettings, headline, moe_analysis, route_texts, save
from .capture import MoELayerPass, batches_of, capture_moe, run_batches
from .controls import expert_label, match_quality, matched_controls, routing_frequency
from .routing import RoutingStats
from .skipping import skip_study, summary_rows
from .super_experts import ExpertMaxima, flag_super_experts, layer_limit
from .super_weights import detect_expert_super_weights, expert_spikes, expert_super_weight_scan
from .texts import calibration_ids, reference_ids, wikitext_paragraphs
from .verdicts import judge

__all__ = [
    "SCHEMA", "ExpertMaxima", "MoELayerPass", "MoESettings", "RoutingStats", "batches_of",
    "calibration_ids", "capture_moe", "detect_expert_super_weights", "expert_label",
    "expert_spikes", "expert_super_weight_scan", "flag_super_experts", "headline", "judge",
    "layer_limit", "match_quality", "matched_controls", "moe_analysis", "reference_ids",
    "route_texts", "routing_frequency", "run_batches", "save", "skip_study", "summary_rows",
    "wikitext_paragraphs",
]
