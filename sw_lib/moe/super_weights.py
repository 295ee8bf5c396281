"""Super weights inside experts: the dense detector's logic, one expert at a time.

In each MoE layer and for each expert (the shared one included) we read the down projection's
input (act(gate) * up, recomputed on the expert's routed tokens) and output. A candidate is
(layer, expert, row, column) where the largest |input| (channel = column) and the largest
|output| (channel = row) both exceed `spike_threshold`, occur on the same token, and the single
product W[row, column] * x[column] explains at least `co_spike_threshold` of that output.
Rarely used experts (p_active below `p_active_floor`) are skipped unless the first (sink) token
routes to them. Found weights are zeroed and the prompt run again, until nothing new appears or
`max_iterations`; every weight is restored at the end.
"""
from __future__ import annotations

import torch

from .. import ablate, arch
from .capture import MoELayerPass, run_batches
from .routing import RoutingStats
from .super_experts import peak
from .texts import text_ids


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


def expert_spikes(model: torch.nn.Module, ids: torch.Tensor) -> tuple[list[dict], RoutingStats]:
    """One forward pass of the [1, S] prompt: each used expert's input/output spike record,
    and the prompt's routing."""
    spikes: list[dict] = []
    routing = RoutingStats()

    def on_pass(p: MoELayerPass) -> None:
        routing(p)
        for expert in range(p.num_experts):
            tokens, inner, out = p.expert_activations(expert)
            if tokens.numel():
                spikes.append(_spike(p, expert, tokens, inner, out,
                                     p.experts_module.down_proj[expert]))
        if p.shared_input is not None:
            inner, out = p.shared_activations()
            tokens = torch.arange(p.num_tokens, device=inner.device)
            spikes.append(_spike(p, None, tokens, inner, out, p.shared_module.down_proj.weight))

    run_batches(model, [ids], on_pass)
    return spikes, routing


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


@torch.no_grad()
def expert_super_weight_scan(lm, prompt: str, spike_threshold: float = 50.0,
                             max_iterations: int = 10, p_active_floor: float = 0.01,
                             co_spike_threshold: float = 0.5, texts: list[str] | None = None,
                             tokens_per_text: int = 128, p_active: dict | None = None) -> dict:
    """The full detection record: accepted weights, rejected spikes (with reasons), and per
    iteration the strongest expert of each layer.

    p_active comes from `p_active` ({layer: [E floats]}, e.g. from a routing analysis), else from
    routing `texts` (WikiText-2 style paragraphs), else from the prompt itself.
    """
    model, tokenizer = lm.model, lm.tokenizer
    if not arch.is_moe_model(model):
        raise ValueError(f"model '{getattr(lm, 'name', '?')}' has no mixture-of-experts layers; "
                         "use the dense detector (sw_lib.detect)")
    if spike_threshold <= 0 or max_iterations < 1:
        raise ValueError(f"need spike_threshold > 0 and max_iterations >= 1, got "
                         f"{spike_threshold} and {max_iterations}")
    ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
    if p_active is None and texts is not None:
        stats = RoutingStats()
        run_batches(model, text_ids(tokenizer, len(texts), tokens_per_text, texts).split(8),
                    stats)
        p_active = {layer: stats.p_active(layer) for layer in stats.layers}
    found: list[dict] = []
    rejected: dict[tuple, dict] = {}
    iterations = []
    for iteration in range(max_iterations):
        with ablate.zeroed(model, found):
            spikes, _ = expert_spikes(model, ids)
        new = []
        for spike in spikes:
            if (spike["input_value"] <= spike_threshold or spike["output_value"] <= spike_threshold
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
        iterations.append({"iteration": iteration, "layers": _strongest(spikes),
                           "new": [[w["layer"], w["expert"], w["shared"], w["row"], w["column"]]
                                   for w in new]})
        if not new:
            break
        found.extend(new)
    return {"super_weights": found, "rejected": list(rejected.values()),
            "iterations": iterations, "prompt_tokens": int(ids.shape[1])}


def _strongest(spikes: list[dict]) -> list[dict]:
    """Per layer, the expert with the largest |output| (what the iteration plot shows)."""
    best: dict[int, dict] = {}
    for s in spikes:
        if s["layer"] not in best or s["output_value"] > best[s["layer"]]["output_value"]:
            best[s["layer"]] = s
    keys = ("layer", "expert", "shared", "input_value", "column", "input_token", "output_value",
            "row", "output_token")
    return [{k: best[layer][k] for k in keys} for layer in sorted(best)]


def detect_expert_super_weights(lm, prompt: str, spike_threshold: float = 50.0,
                                max_iterations: int = 10, p_active_floor: float = 0.01,
                                co_spike_threshold: float = 0.5,
                                texts: list[str] | None = None) -> list[dict]:
    """Expert super weights of an MoE model as weight dicts in the shared vocabulary:
    {"layer", "row", "column", "expert": int | None, "shared": bool, "iteration",
    "input_value", "output_value", "input_token", "output_token", "co_occurs",
    "explained_share", ...}; values are float32 magnitudes, tokens are prompt positions."""
    return expert_super_weight_scan(lm, prompt, spike_threshold, max_iterations, p_active_floor,
                                    co_spike_threshold, texts)["super_weights"]
