"""The whole MoE analysis of one model, as the JSON that notebook 04 writes.

Routing statistics and expert maxima over `router_analysis_samples` WikiText-2 texts (one
pass), super experts flagged from the maxima, expert super weights detected on the prompt (with
p_active from the same texts), and optionally their causal scores.
"""
from __future__ import annotations

import time

from .. import arch
from .capture import run_batches
from .causal import score_super_experts, score_weights
from .routing import RoutingStats
from .super_experts import ExpertMaxima, flag_super_experts
from .super_weights import expert_super_weight_scan
from .texts import text_ids

SCHEMA = "sw-moe/1"
DEFAULT_PROMPT = "Apple Inc. is a worldwide tech company."


def route_texts(lm, num_texts: int = 32, tokens_per_text: int = 128, batch_size: int = 8,
                texts: list[str] | None = None) -> tuple[RoutingStats, ExpertMaxima, dict]:
    """One pass over the first `num_texts` WikiText-2 paragraphs (or of `texts`) that have
    `tokens_per_text` tokens: routing statistics and expert maxima."""
    ids = text_ids(lm.tokenizer, num_texts, tokens_per_text, texts)
    routing, maxima = RoutingStats(), ExpertMaxima()

    def on_pass(p):
        routing(p)
        maxima(p)

    run_batches(lm.model, ids.split(batch_size), on_pass, progress="routing texts")
    source = "wikitext-2-raw-v1/test paragraphs" if texts is None else "given texts"
    texts = {"source": source, "count": int(ids.shape[0]),
             "tokens_per_text": int(ids.shape[1])}
    return routing, maxima, texts


def moe_analysis(lm, router_analysis_samples: int = 32, prompt: str = DEFAULT_PROMPT,
                 spike_threshold: float = 50.0, max_iterations: int = 10,
                 p_active_floor: float = 0.01, co_spike_threshold: float = 0.5,
                 enable_causal_scoring: bool = False, tokens_per_text: int = 128,
                 batch_size: int = 8, control_seeds: int = 5,
                 reference_tokens: int = 512) -> dict:
    """Everything notebook 04 reports, as a JSON-ready dict (schema "sw-moe/1")."""
    model = lm.model
    config = dict(router_analysis_samples=router_analysis_samples, prompt=prompt,
                  spike_threshold=spike_threshold, max_iterations=max_iterations,
                  p_active_floor=p_active_floor, co_spike_threshold=co_spike_threshold,
                  enable_causal_scoring=enable_causal_scoring, tokens_per_text=tokens_per_text,
                  control_seeds=control_seeds, reference_tokens=reference_tokens,
                  dtype=str(lm.dtype).removeprefix("torch."), device=str(lm.device))
    result = {"schema": SCHEMA, "model": lm.name, "fingerprint": lm.fingerprint,
              "family": lm.family.name, "num_layers": arch.num_layers(model),
              "is_moe": arch.is_moe_model(model), "config": config}
    if not result["is_moe"]:
        return dict(result, moe_layers=[], dense_layers=arch.dense_layers(model), routing=[],
                    expert_maxima=[], super_experts=None, expert_super_weights=[],
                    detection=None, causal=None, timing={})
    start = time.perf_counter()
    routing, maxima, texts = route_texts(lm, router_analysis_samples, tokens_per_text, batch_size)
    routing_seconds = time.perf_counter() - start
    expert_maxima = maxima.to_list()
    super_experts = flag_super_experts(expert_maxima, result["num_layers"])
    start = time.perf_counter()
    scan = expert_super_weight_scan(
        lm, prompt, spike_threshold, max_iterations, p_active_floor, co_spike_threshold,
        p_active={layer: routing.p_active(layer) for layer in routing.layers})
    detection_seconds = time.perf_counter() - start
    causal = None
    start = time.perf_counter()
    if enable_causal_scoring:
        weights = score_weights(lm, scan["super_weights"], reference_tokens)
        scan["super_weights"] = weights.pop("weights")
        causal = {"expert_super_weights": weights,
                  "super_experts": score_super_experts(lm, super_experts["flagged"],
                                                       control_seeds, reference_tokens)}
    layers = arch.moe_layers(model)
    return dict(result, moe_layers=layers, dense_layers=arch.dense_layers(model),
                num_experts=arch.num_experts(model, layers[0]),
                top_k=arch.experts_per_token(model), texts=texts, routing=routing.to_list(),
                expert_maxima=expert_maxima, super_experts=super_experts,
                expert_super_weights=scan["super_weights"],
                detection={k: scan[k] for k in ("rejected", "iterations", "prompt_tokens")},
                causal=causal,
                timing={"routing_seconds": routing_seconds,
                        "detection_seconds": detection_seconds,
                        "causal_seconds": time.perf_counter() - start})

