"""The whole MoE analysis of one model: the document notebook 04 shows and writes.

1. Calibration (`texts`): routing statistics and each expert's peaks over
   `router_analysis_samples` texts of `tokens_per_text` tokens, in one pass.
2. Super experts by the reference rule (`super_experts`), each with its routing frequency, and
   frequency-matched control experts (`controls`, seeded by `seed`).
3. Expert super weights on the prompt (`super_weights`), with p_active from the calibration.
4. Verdicts (`verdicts`, when `confirm`): expert super weights and super experts against their
   controls, as dense super weights get them.
5. The skip evaluation (`skipping`): perplexity and the accuracy tasks with the super experts
   skipped, against each control set skipped (the `evaluation` settings of notebooks 02/03).

`moe_analysis` builds the JSON document (schema "sw-moe/2"), `save` writes it through the results
layout; every keyword default is read from params/default.yaml.
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from .. import arch, config, findings, results, spikes, verdict
from ..study import StudySettings
from .capture import batches_of, run_batches
from .controls import STATEMENT, match_quality, matched_controls, routing_frequency
from .routing import RoutingStats
from .skipping import skip_study
from .super_experts import ExpertMaxima, flag_super_experts
from .super_weights import expert_super_weight_scan
from .texts import SOURCE, calibration_ids
from .verdicts import judge

SCHEMA = "sw-moe/2"
DEFAULT_PROMPT = config.default("detection.prompt")


def _default(dotted: str):
    return field(default_factory=lambda: config.default(dotted))


@dataclass
class MoESettings:
    """What notebook 04 analyses (params `moe`, and the detection and seed fields it shares
    with notebook 01); defaults from params/default.yaml."""

    router_analysis_samples: int = _default("moe.router_analysis_samples")
    tokens_per_text: int = _default("moe.tokens_per_text")
    p_active_floor: float = _default("moe.p_active_floor")
    co_spike_threshold: float = _default("moe.co_spike_threshold")
    control_sets: int = _default("moe.control_sets")
    control_match_pool: int = _default("moe.control_match_pool")
    prompt: str = _default("detection.prompt")
    spike_threshold: float = _default("detection.spike_threshold")
    spike_threshold_mode: str = _default("detection.spike_threshold_mode")
    relative_spike_factor: float = _default("detection.relative_spike_factor")
    max_iterations: int = _default("detection.max_iterations")
    confirm: bool = _default("detection.confirm")
    super_ratio: float = _default("detection.super_ratio")
    control_largest: int = _default("detection.control_largest")
    control_random: int = _default("detection.control_random")
    reference_tokens: int = _default("detection.reference_tokens")
    seed: int = _default("runtime.seed")
    progress: bool = True

    @classmethod
    def from_dict(cls, params: dict) -> "MoESettings":
        """Build from a (flat) params mapping; keys this class does not know are ignored."""
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in params.items() if k in names})

    def threshold(self) -> spikes.SpikeThreshold:
        return spikes.SpikeThreshold(self.spike_threshold_mode, self.spike_threshold,
                                     self.relative_spike_factor)

    def to_dict(self) -> dict:
        return {k: v for k, v in asdict(self).items() if k != "progress"}


def route_texts(lm, num_texts: int, tokens_per_text: int, batch_size: int | None = None,
                token_budget: int | None = None, texts: list[str] | None = None
                ) -> tuple[RoutingStats, ExpertMaxima, dict]:
    """One pass over the calibration texts (`texts.calibration_ids`): routing statistics, expert
    maxima and what was read."""
    ids = calibration_ids(lm.tokenizer, num_texts, tokens_per_text, texts)
    routing, maxima = RoutingStats(), ExpertMaxima()

    def on_pass(p):
        routing(p)
        maxima(p)

    run_batches(lm.model, batches_of(ids, batch_size, token_budget), on_pass,
                progress="calibration texts")
    info = {"source": SOURCE if texts is None else "given texts", "count": int(ids.shape[0]),
            "tokens_per_text": int(ids.shape[1]), "tokens": int(ids.numel())}
    return routing, maxima, info


def _has_evaluation(evaluation: StudySettings) -> bool:
    return not evaluation.skip_perplexity or bool(evaluation.tasks())


def _head(lm, settings: MoESettings, evaluation: StudySettings) -> dict:
    model = lm.model
    return {"schema": SCHEMA, "model": lm.name, "fingerprint": lm.fingerprint,
            "family": lm.family.name, "num_layers": arch.num_layers(model),
            "is_moe": arch.is_moe_model(model),
            "config": {**settings.to_dict(), "spike_rule": settings.threshold().to_dict(),
                       "evaluation": evaluation.to_dict(),
                       "dtype": str(lm.dtype).removeprefix("torch."), "device": str(lm.device)}}


def moe_analysis(lm, settings: MoESettings | None = None, evaluation: StudySettings | None = None,
                 cache=None) -> dict:
    """Everything notebook 04 reports, as a JSON-ready dict (schema "sw-moe/2"; the fields are
    in docs/ARCHITECTURE.md). A dense model gets `is_moe: false` and empty sections."""
    settings = settings or MoESettings()
    evaluation = (evaluation or StudySettings()).for_model(lm)
    head = _head(lm, settings, evaluation)
    model = lm.model
    if not head["is_moe"]:
        return dict(head, moe_layers=[], dense_layers=arch.dense_layers(model), calibration=None,
                    routing=[], expert_maxima=[], super_experts=None, controls=None,
                    expert_super_weights=[], detection=None, verdicts=None, skip_evaluation=None,
                    timing={})
    timing = {}
    start = time.perf_counter()
    routing, maxima, calibration = route_texts(lm, settings.router_analysis_samples,
                                               settings.tokens_per_text, evaluation.batch_size,
                                               evaluation.resolved_token_budget)
    p_active = {layer: routing.p_active(layer) for layer in routing.layers}
    expert_maxima = maxima.to_list()
    super_experts = flag_super_experts(expert_maxima, head["num_layers"])
    flagged = super_experts["flagged"]
    for m in flagged:
        m["p_active"] = routing_frequency(m, p_active)
    control_sets = matched_controls(flagged, p_active, settings.control_sets,
                                    settings.control_match_pool, settings.seed)
    timing["calibration_seconds"] = time.perf_counter() - start

    start = time.perf_counter()
    scan = expert_super_weight_scan(lm, settings.prompt, settings.threshold(),
                                    settings.max_iterations, settings.p_active_floor,
                                    settings.co_spike_threshold, p_active)
    weights = scan["super_weights"]
    timing["detection_seconds"] = time.perf_counter() - start

    start = time.perf_counter()
    verdicts = None
    if settings.confirm:
        rule = verdict.VerdictRule(super_ratio=settings.super_ratio, seed=settings.seed)
        verdicts = judge(lm, weights, flagged, control_sets, rule, settings.control_largest,
                         settings.control_random, settings.reference_tokens, settings.progress)
    else:
        for record in [*weights, *flagged]:
            record["verdict"] = None
    timing["verdict_seconds"] = time.perf_counter() - start

    start = time.perf_counter()
    skipping = (skip_study(lm, flagged, control_sets, evaluation, cache)
                if _has_evaluation(evaluation) else None)
    timing["skip_evaluation_seconds"] = time.perf_counter() - start

    layers = arch.moe_layers(model)
    return dict(head, moe_layers=layers, dense_layers=arch.dense_layers(model),
                num_experts=arch.num_experts(model, layers[0]),
                top_k=arch.experts_per_token(model), calibration=calibration,
                routing=routing.to_list(), expert_maxima=expert_maxima,
                super_experts=super_experts,
                controls={"statement": STATEMENT, "match_pool": settings.control_match_pool,
                          "seed": settings.seed, "sets": control_sets,
                          **match_quality(control_sets)},
                expert_super_weights=weights,
                detection={k: scan[k] for k in ("rejected", "iterations", "prompt_tokens",
                                                "spike_rule")},
                verdicts=verdicts, skip_evaluation=skipping, timing=timing)


def headline(document: dict) -> str:
    """One sentence: the super experts' skip effect against the controls' (or why there is none);
    the same sentence as the report's findings block."""
    if not document.get("is_moe"):
        return f"{document['model']} has no mixture-of-experts layers."
    if not document["super_experts"]["flagged"]:
        return "No super expert was flagged: nothing to skip."
    return findings.skip_sentence(document)


def save(document: dict, paths: results.ModelPaths, files: dict[str, Path] | None = None) -> Path:
    """Write the document to `data/moe_analysis_<ts>.json` of the results layout, with the run's
    timestamp and the files written beside it."""
    document = dict(document, run_timestamp=paths.ts,
                    files={k: str(v) for k, v in (files or {}).items()})
    return results.write_json(paths.moe_json, document)
