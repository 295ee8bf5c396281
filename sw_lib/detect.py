"""Dense super weight detection: spikes, iterate-and-zero, verdicts against a control.

Seed behaviour (the original script): feed one prompt, hook every layer's down projection, take
per layer the largest |input| and |output|; a layer is a candidate when both exceed
`spike_threshold`; the weight is [row = output channel, column = input channel]. Zero what was
found and run again, up to `max_iterations`, until no new coordinate appears; restore all.

Beyond the seed:
- the token of each spike is kept and `co_occurs` says whether input and output peak on the
  same token (a weight can only create the output spike where its input spikes);
- where the MLP output passes a norm with a learned gain before the residual add (Gemma 2 / 3),
  that norm's output is read too: a small raw output can enter the residual stream huge. Its
  largest channel is then the row; `flagged_by` says which reading(s) flagged a candidate;
- late layers spike too, without being causal: every candidate gets a verdict from its own
  effect on a reference text no evaluation reads, against zeroing ordinary weights of the same
  matrix (`sw_lib.verdict`, rule in its docstring): super_weight, contributor or no_effect;
- candidates are grouped by (layer, column), since zeroing one row of a column leaves the
  input spike and lets further rows surface in later iterations; each group's joint effect is
  measured too, but a member earns its verdict by its own effect;
- the spike threshold is absolute (the seed's) or relative to the layer's median token peak
  (`sw_lib.spikes`); each iteration records the thresholds it applied per layer;
- statistics are computed in float32 whatever the model dtype.
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field

import torch

from . import ablate, arch, catalog, config, edits, hooks, moe, reference, spikes, verdict

# Keyword defaults come from params/default.yaml (the one source of defaults).
DEFAULT_PROMPT = config.default("detection.prompt")
DEFAULT_THRESHOLD = config.default("detection.spike_threshold")
DEFAULT_THRESHOLD_MODE = config.default("detection.spike_threshold_mode")
DEFAULT_RELATIVE_FACTOR = config.default("detection.relative_spike_factor")
DEFAULT_ITERATIONS = config.default("detection.max_iterations")
READINGS = ("down_proj", "post_norm")


@dataclass
class LayerMaxima:
    """Largest |input| and |output| of one layer's down projection (float32), and the largest
    |output| of the post-MLP norm where the layer has one (else None); with each reading, the
    median over the tokens of each token's largest |value| (what relative thresholds scale)."""

    layer: int
    max_input: float
    input_token: int
    input_channel: int
    max_output: float
    output_token: int
    output_channel: int
    max_post_norm: float | None = None
    post_norm_token: int | None = None
    post_norm_channel: int | None = None
    median_input: float | None = None
    median_output: float | None = None
    median_post_norm: float | None = None

    def readings(self) -> list[tuple[str, float, int, int, float | None]]:
        """(reading, value, token, channel, median peak) of each output reading of the layer."""
        out = [("down_proj", self.max_output, self.output_token, self.output_channel,
                self.median_output)]
        if self.max_post_norm is not None:
            out.append(("post_norm", self.max_post_norm, self.post_norm_token,
                        self.post_norm_channel, self.median_post_norm))
        return out


@dataclass
class Detection:
    model: str
    fingerprint: str
    family: str
    num_layers: int
    config: dict
    candidates: list[dict]
    groups: list[dict]
    iterations: list[dict]
    reference: dict | None
    published: dict | None
    timing: dict
    tokens: list[str] = field(default_factory=list)
    rule: dict | None = None  # the verdict rule used; None: no causal test (confirm off)

    @property
    def super_weights(self) -> list[dict]:
        """Candidates with verdict super_weight; every candidate when there was no causal
        test (the original script's behaviour)."""
        if self.rule is None:
            return list(self.candidates)
        return [c for c in self.candidates if c["verdict"] == "super_weight"]

    @property
    def contributors(self) -> list[dict]:
        return [c for c in self.candidates if c.get("verdict") == "contributor"]

    def counts(self) -> dict[str, int]:
        """How many candidates got each verdict (all zero without a causal test)."""
        return {v: sum(c.get("verdict") == v for c in self.candidates) for v in verdict.VERDICTS}

    def to_dict(self) -> dict:
        d = asdict(self)
        rule = d.pop("rule")
        return {"schema": "sw-detection/2", **d, "super_weights": self.super_weights,
                "contributors": self.contributors, "verdict_counts": self.counts(),
                "verdict_rule": rule,
                "super_weights_are": ("candidates with verdict super_weight" if rule else
                                      "every candidate: no causal test was run (confirm off), "
                                      "as in the original script")}


# --- one forward pass: the per-layer maxima ------------------------------------------------


def _abs_argmax(t: torch.Tensor) -> tuple[float, int, int]:
    """(max |t|, token, channel) of a [tokens, channels] tensor, in float32."""
    a = t.float().abs()
    flat = int(torch.argmax(a))
    token, channel = divmod(flat, a.shape[1])
    return float(a[token, channel]), token, channel


@torch.no_grad()
def layer_maxima(model: torch.nn.Module, input_ids: torch.Tensor) -> list[LayerMaxima]:
    """One forward pass with a hook on every dense down projection (and post-MLP norm)."""
    stats: dict[int, LayerMaxima] = {}

    def on_down_proj(layer):
        def record(module, args, output):
            x, y = args[0][0], output[0]  # first sequence: [tokens, channels]
            stats[layer] = LayerMaxima(
                layer, *_abs_argmax(x), *_abs_argmax(y),
                median_input=spikes.median_peak(spikes.token_peaks(x)),
                median_output=spikes.median_peak(spikes.token_peaks(y)))
        return record

    def on_post_norm(layer):
        def record(module, args, output):  # runs after the layer's down projection
            value, token, channel = _abs_argmax(output[0])
            stats[layer].max_post_norm = value
            stats[layer].post_norm_token, stats[layer].post_norm_channel = token, channel
            stats[layer].median_post_norm = spikes.median_peak(spikes.token_peaks(output[0]))
        return record

    pairs = []
    for i in arch.dense_layers(model):
        pairs.append((arch.down_proj(model, i), on_down_proj(i)))
        norm = arch.post_mlp_norm(model, i)
        if norm is not None:
            pairs.append((norm, on_post_norm(i)))
    with hooks.attached(pairs):
        model(input_ids.to(next(model.parameters()).device))
    return [stats[i] for i in sorted(stats)]


# --- iterate and zero ---------------------------------------------------------------------


def layer_thresholds(m: LayerMaxima, threshold: spikes.SpikeThreshold) -> dict[str, float]:
    """The threshold each reading of the layer must exceed ("input", "down_proj", "post_norm")."""
    out = {"input": threshold.value(m.median_input)}
    for reading, _, _, _, median in m.readings():
        out[reading] = threshold.value(median)
    return out


def _spike_candidates(m: LayerMaxima, threshold: spikes.SpikeThreshold) -> dict[tuple, dict]:
    """The coordinates one layer's readings flag, each with the readings that flagged it."""
    found: dict[tuple, dict] = {}
    limits = layer_thresholds(m, threshold)
    if m.max_input <= limits["input"]:
        return found
    for reading, value, token, channel, _ in m.readings():
        if value <= limits[reading]:
            continue
        coord = (m.layer, channel, m.input_channel)
        c = found.setdefault(coord, {
            "layer": m.layer, "row": channel, "column": m.input_channel, "expert": None,
            "shared": False, "input_value": m.max_input, "input_token": m.input_token,
            "output_value": value, "output_token": token, "flagged_by": []})
        c["flagged_by"].append(reading)
        c[f"{reading}_value"] = value
    for c in found.values():
        c["co_occurs"] = c["input_token"] == c["output_token"]
    return found


def find_candidates(model, input_ids, spike_threshold=DEFAULT_THRESHOLD,
                    max_iterations=DEFAULT_ITERATIONS, require_co_occurrence=False):
    """The seed's loop. Returns (candidates, iterations) with the model restored.

    `spike_threshold`: a number (absolute) or a `spikes.SpikeThreshold`."""
    threshold = spikes.as_threshold(spike_threshold)
    candidates: list[dict] = []
    iterations: list[dict] = []
    seen: set[tuple[int, int, int]] = set()
    for iteration in range(max_iterations):
        with ablate.zeroed(model, seen):
            maxima = layer_maxima(model, input_ids)
        new = []
        for m in maxima:
            for coord, c in _spike_candidates(m, threshold).items():
                if coord in seen or (require_co_occurrence and not c["co_occurs"]):
                    continue
                new.append(coord)
                candidates.append({**c, "iteration": iteration})
        iterations.append({"iteration": iteration,
                           "layers": [{**asdict(m), "thresholds": layer_thresholds(m, threshold)}
                                      for m in maxima],
                           "new": [list(c) for c in new]})
        if not new:
            break
        seen.update(new)
    return candidates, iterations


def group_by_column(candidates: list[dict]) -> list[dict]:
    """Group candidates sharing (layer, expert, column): one input spike feeding several rows."""
    groups: dict[tuple, dict] = {}
    for c in candidates:
        key = (c["layer"], c.get("expert"), c["column"])
        g = groups.setdefault(key, {"layer": c["layer"], "expert": c.get("expert"),
                                    "column": c["column"], "rows": []})
        g["rows"].append(c["row"])
    return list(groups.values())


# --- verdicts -------------------------------------------------------------------------------


def _members(candidates: list[dict], group: dict) -> list[int]:
    key = (group["layer"], group["expert"], group["column"])
    return [i for i, c in enumerate(candidates)
            if (c["layer"], c.get("expert"), c["column"]) == key]


def _brief_control(control: dict) -> dict:
    return {k: v for k, v in control.items() if k != "conditions"}


def judge_candidates(model, candidates: list[dict], groups: list[dict],
                     ref: reference.ReferenceText, rule: verdict.VerdictRule,
                     control_largest: int = verdict.DEFAULT_CONTROL_LARGEST,
                     control_random: int = verdict.DEFAULT_CONTROL_RANDOM,
                     progress: bool = True) -> dict:
    """Give every candidate (and every multi-row group) its effect, control and verdict, in
    place. Returns what the JSON says about the reference text."""
    cases = verdict.weight_cases(model, candidates, control_largest, control_random, rule.seed)
    multi = [(g, _members(candidates, g)) for g in groups if len(g["rows"]) > 1]
    for _, members in multi:
        controls = {cond: d for i in members for d, cond in cases[i].controls}
        cases.append(verdict.Case(edits.EditSet.zeroing([candidates[i] for i in members]),
                                  [(d, cond) for cond, d in controls.items()]))
    layers = {case.condition.first_layer for case in cases}
    meter = reference.Meter(model, ref.ids, layers)
    judged = verdict.judge(meter, cases, rule, progress)
    for c, result in zip(candidates, judged):
        c.update(result)
    for (g, _), result in zip(multi, judged[len(candidates):]):
        g.update(result, control=_brief_control(result["control"]))
    for g in groups:
        if len(g["rows"]) == 1:
            (only,) = _members(candidates, g)
            g.update({k: candidates[only][k] for k in judged[0] if k != "control"},
                     control=_brief_control(candidates[only]["control"]))
    return {**ref.info(), "predicted_tokens": int(meter.baseline.numel()),
            "baseline_loss": float(meter.baseline.double().mean())}


# --- the whole detection -------------------------------------------------------------------


def detect_super_weights(lm, prompt: str = DEFAULT_PROMPT,
                         spike_threshold: float = DEFAULT_THRESHOLD,
                         max_iterations: int = DEFAULT_ITERATIONS,
                         spike_threshold_mode: str = DEFAULT_THRESHOLD_MODE,
                         relative_spike_factor: float = DEFAULT_RELATIVE_FACTOR,
                         confirm_candidates: bool = True,
                         super_ratio: float = verdict.DEFAULT_SUPER_RATIO,
                         control_largest: int = verdict.DEFAULT_CONTROL_LARGEST,
                         control_random: int = verdict.DEFAULT_CONTROL_RANDOM,
                         reference_tokens: int = reference.DEFAULT_TOKENS,
                         require_co_occurrence: bool = False,
                         moe_options: dict | None = None,
                         seed: int = verdict.DEFAULT_SEED,
                         progress: bool = True) -> Detection:
    """Find, group and judge the super weight candidates of a `LoadedModel`.

    Dense down projections are scanned here; for a mixture-of-experts model the expert super
    weights found by `sw_lib.moe` (with `moe_options`: p_active_floor, co_spike_threshold)
    join the same candidate list, so verdicts, grouping and the JSON treat both alike.
    `confirm_candidates=False` skips the causal test: every candidate has verdict None and
    counts as a super weight (the original script's behaviour). `spike_threshold_mode`
    "relative" replaces the absolute `spike_threshold` by `relative_spike_factor` times each
    layer's median token peak (`sw_lib.spikes`), for dense and expert readings alike.
    """
    threshold = spikes.SpikeThreshold(spike_threshold_mode, spike_threshold, relative_spike_factor)
    if max_iterations < 1:
        raise ValueError(f"max_iterations must be at least 1, got {max_iterations}")
    if control_largest < 0 or control_random < 0:
        raise ValueError(f"control_largest and control_random must be >= 0, got "
                         f"{control_largest} and {control_random}")
    rule = verdict.VerdictRule(super_ratio=super_ratio, seed=seed)
    model, tokenizer = lm.model, lm.tokenizer
    ref = reference.reference_text(tokenizer, reference_tokens) if confirm_candidates else None
    input_ids = tokenizer(prompt, return_tensors="pt").input_ids
    start = time.perf_counter()
    candidates, iterations = find_candidates(model, input_ids, threshold, max_iterations,
                                             require_co_occurrence)
    if lm.family.moe is not None:
        candidates += [{**c, "flagged_by": ["down_proj"]} for c in moe.detect_expert_super_weights(
            lm, prompt, threshold, max_iterations, **(moe_options or {}))]
    detection_seconds = time.perf_counter() - start
    tokens = [tokenizer.decode([t]) for t in input_ids[0].tolist()]
    for c in candidates:
        c["token_text"] = tokens[c["output_token"]]
    groups = group_by_column(candidates)

    start = time.perf_counter()
    reference_info = None
    if ref is not None:
        reference_info = ref.info()
        if candidates:
            reference_info = judge_candidates(model, candidates, groups, ref, rule,
                                              control_largest, control_random, progress)
    else:
        for c in candidates + groups:
            c["verdict"] = None
    verdict_seconds = time.perf_counter() - start

    return Detection(
        model=lm.name, fingerprint=lm.fingerprint, family=lm.family.name,
        num_layers=arch.num_layers(model),
        config={"prompt": prompt, "spike_threshold": spike_threshold,
                "spike_threshold_mode": spike_threshold_mode,
                "relative_spike_factor": relative_spike_factor,
                "spike_rule": threshold.to_dict()["statement"],
                "max_iterations": max_iterations, "confirm": confirm_candidates,
                "super_ratio": super_ratio, "control_largest": control_largest,
                "control_random": control_random, "reference_tokens": reference_tokens,
                "require_co_occurrence": require_co_occurrence, "moe_options": moe_options,
                "dtype": str(lm.dtype).removeprefix("torch."), "device": str(lm.device)},
        candidates=candidates, groups=groups, iterations=iterations, reference=reference_info,
        published=catalog.compare(lm.name, candidates),
        timing={"detection_seconds": detection_seconds, "verdict_seconds": verdict_seconds},
        tokens=tokens,
        rule=({**rule.to_dict(), "control_largest": control_largest,
               "control_random": control_random} if confirm_candidates else None),
    )
