"""Super weights inside experts: the dense detector's logic, one expert at a time.

In each MoE layer and for each expert (the shared one included) we read the down projection's
input (act(gate) * up, recomputed on the expert's routed tokens) and output. A candidate is
(layer, expert, row, column) where the largest |input| (channel = column) and the largest
|output| (channel = row) both exceed the spike threshold (`sw_lib.spikes`: absolute, or relative
to the layer's median token peak over every expert's tokens), occur on the same token, and the
single product W[row, column] * x[column] explains at least `co_spike_threshold` of that output.
Rarely used experts (p_active below `p_active_floor`) are skipped unless the first (sink) token
routes to them. Found weights are zeroed and the prompt run again, until nothing new appears or
`max_iterations`; every weight is restored at the end.
"""
from __future__ import annotations

import torch

from .. import ablate, arch, config, spikes
from .capture import MoELayerPass, run_batches
from .routing import RoutingStats
from .super_experts import peak

# Keyword defaults come from params/default.yaml (the one source of defaults).
DEFAULT_PROMPT = config.default("detection.prompt")
DEFAULT_ITERATIONS = config.default("detection.max_iterations")
DEFAULT_P_ACTIVE_FLOOR = config.default("moe.p_active_floor")
DEFAULT_CO_SPIKE = config.default("moe.co_spike_threshold")


def _default_threshold() -> spikes.SpikeThreshold:
    return spikes.SpikeThreshold()


def _spike(p: MoELayerPass, expert: int | None, tokens: torch.Tensor, inner: torch.Tensor,
           out: torch.Tensor, weight: torch.Tensor) -> dict:
    input_value, in_i, column = peak(inner)
    output_value, out_i, row = peak(out)
    # Share of the output spike that the one product W[row, column] * x[column] makes, on the
    # output spike's token (1.0: the weight alone writes it).
    y = float(out[out_i, row])
    product = float(weight[row, column].float() * inner[out_i, column])
    return {
        "layer": p.layer, "row": row, "column": column, "expert": expert,
        "shared": expert is None,
        "input_value": input_value, "output_value": output_value,
        "input_token": int(tokens[in_i]), "output_token": int(tokens[out_i]),
        "co_occurs": int(tokens[in_i]) == int(tokens[out_i]),
        "explained_share": product / y if y != 0.0 else 0.0,
        "tokens": int(tokens.numel()),
        "p_active": tokens.numel() / p.num_tokens,
        "sink_routed": bool((tokens == 0).any()),
    }


def expert_spikes(model: torch.nn.Module, ids: torch.Tensor
                  ) -> tuple[list[dict], RoutingStats, dict[int, dict]]:
    """One forward pass of the [1, S] prompt: each used expert's input/output spike record, the
    prompt's routing, and per MoE layer the median token peaks of the experts' inputs and
    outputs (pooled over every (token, expert) pair the layer computed)."""
    found: list[dict] = []
    routing = RoutingStats()
    peaks: dict[int, dict[str, list]] = {}

    def on_pass(p: MoELayerPass) -> None:
        routing(p)
        layer_peaks = peaks.setdefault(p.layer, {"input": [], "output": []})

        def record(expert, tokens, inner, out, weight):
            found.append(_spike(p, expert, tokens, inner, out, weight))
            layer_peaks["input"].append(spikes.token_peaks(inner))
            layer_peaks["output"].append(spikes.token_peaks(out))

        for expert in range(p.num_experts):
            tokens, inner, out = p.expert_activations(expert)
            if tokens.numel():
                record(expert, tokens, inner, out, p.experts_module.down_proj[expert])
        if p.shared_input is not None:
            inner, out = p.shared_activations()
            tokens = torch.arange(p.num_tokens, device=inner.device)
            record(None, tokens, inner, out, p.shared_module.down_proj.weight)

    run_batches(model, [ids], on_pass)
    medians = {layer: {f"median_{k}": spikes.median_peak(v) for k, v in d.items()}
               for layer, d in peaks.items()}
    return found, routing, medians


def _reasons(spike: dict, p_active: float, p_active_floor: float,
             co_spike_threshold: float) -> list[str]:
    """Why a spike that passed the threshold is not a super weight (empty: it is one)."""
    reasons = []
    if not spike["shared"] and p_active < p_active_floor and not spike["sink_routed"]:
        reasons.append(f"p_active {p_active:.3g} < {p_active_floor} and the sink token is not "
                       "routed to it")
    if not spike["co_occurs"]:
        reasons.append("input and output spikes on different tokens")
    if spike["explained_share"] < co_spike_threshold:
        reasons.append(f"W[row, column] * x[column] explains {spike['explained_share']:.3g} "
                       f"< {co_spike_threshold} of the output")
    return reasons


def _key(w: dict) -> tuple:
    return (w["layer"], w["expert"], w["shared"], w["row"], w["column"])


def _thresholds(threshold: spikes.SpikeThreshold, medians: dict) -> dict[str, float]:
    return {"input": threshold.value(medians["median_input"]),
            "output": threshold.value(medians["median_output"])}


@torch.no_grad()
def expert_super_weight_scan(lm, prompt: str = DEFAULT_PROMPT,
                             spike_threshold: float | spikes.SpikeThreshold | None = None,
                             max_iterations: int = DEFAULT_ITERATIONS,
                             p_active_floor: float = DEFAULT_P_ACTIVE_FLOOR,
                             co_spike_threshold: float = DEFAULT_CO_SPIKE,
                             p_active: dict | None = None) -> dict:
    """The full detection record: accepted weights, rejected spikes (with reasons), and per
    iteration the strongest expert of each layer and the thresholds applied there.

    spike_threshold: a number (absolute), a `spikes.SpikeThreshold`, or None (params/default.yaml).
    p_active comes from `p_active` ({layer: [E floats]}, e.g. from the calibration texts' routing),
    else from the prompt itself.
    """
    model, tokenizer = lm.model, lm.tokenizer
    if not arch.is_moe_model(model):
        raise ValueError(f"model '{getattr(lm, 'name', '?')}' has no mixture-of-experts layers; "
                         "use the dense detector (sw_lib.detect)")
    threshold = _default_threshold() if spike_threshold is None else \
        spikes.as_threshold(spike_threshold)
    if max_iterations < 1:
        raise ValueError(f"need max_iterations >= 1, got {max_iterations}")
    ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
    found: list[dict] = []
    rejected: dict[tuple, dict] = {}
    iterations = []
    for iteration in range(max_iterations):
        with ablate.zeroed(model, found):
            spike_records, _, medians = expert_spikes(model, ids)
        limits = {layer: _thresholds(threshold, m) for layer, m in medians.items()}
        new = []
        for spike in spike_records:
            limit = limits[spike["layer"]]
            if (spike["input_value"] <= limit["input"] or spike["output_value"] <= limit["output"]
                    or _key(spike) in {_key(w) for w in found}):
                continue
            active = (spike["p_active"] if p_active is None or spike["shared"]
                      else p_active[spike["layer"]][spike["expert"]])
            reasons = _reasons(spike, active, p_active_floor, co_spike_threshold)
            record = dict(spike, iteration=iteration, p_active=active,
                          token_text=tokenizer.decode(ids[0, spike["output_token"]]))
            if reasons:
                rejected.setdefault(_key(spike), dict(record, reasons=reasons))
            else:
                new.append(record)
        iterations.append({"iteration": iteration,
                           "layers": [dict(s, **medians[s["layer"]], thresholds=limits[s["layer"]])
                                      for s in _strongest(spike_records)],
                           "new": [[w["layer"], w["expert"], w["shared"], w["row"], w["column"]]
                                   for w in new]})
        if not new:
            break
        found.extend(new)
    return {"super_weights": found, "rejected": list(rejected.values()),
            "iterations": iterations, "prompt_tokens": int(ids.shape[1]),
            "spike_rule": threshold.to_dict()}


def _strongest(spikes: list[dict]) -> list[dict]:
    """Per layer, the expert with the largest |output| (what the iteration plot shows)."""
    best: dict[int, dict] = {}
    for s in spikes:
        if s["layer"] not in best or s["output_value"] > best[s["layer"]]["output_value"]:
            best[s["layer"]] = s
    keys = ("layer", "expert", "shared", "input_value", "column", "input_token", "output_value",
            "row", "output_token")
    return [{k: best[layer][k] for k in keys} for layer in sorted(best)]


def detect_expert_super_weights(lm, prompt: str = DEFAULT_PROMPT,
                                spike_threshold: float | spikes.SpikeThreshold | None = None,
                                max_iterations: int = DEFAULT_ITERATIONS,
                                p_active_floor: float = DEFAULT_P_ACTIVE_FLOOR,
                                co_spike_threshold: float = DEFAULT_CO_SPIKE,
                                p_active: dict | None = None) -> list[dict]:
    """Expert super weights of an MoE model as weight dicts in the shared vocabulary:
    {"layer", "row", "column", "expert": int | None, "shared": bool, "iteration",
    "input_value", "output_value", "input_token", "output_token", "co_occurs",
    "explained_share", ...}; values are float32 magnitudes, tokens are prompt positions."""
    return expert_super_weight_scan(lm, prompt, spike_threshold, max_iterations, p_active_floor,
                                    co_spike_threshold, p_active)["super_weights"]
