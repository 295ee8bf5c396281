"""Routing statistics per MoE layer and expert.

`p_active[e]` = tokens routed to e / tokens seen (sums to top_k over a layer's experts). The
first token of every text (the attention sink, where super activations form) is tracked
separately: how often it goes to each expert and with what weight.
"""
from __future__ import annotations

import math

import torch

from .capture import MoELayerPass


class RoutingStats:
    """Accumulates routing over forward passes; call it with each `MoELayerPass`."""

    def __init__(self) -> None:
        self.layers: dict[int, dict] = {}

    def _layer(self, p: MoELayerPass) -> dict:
        if p.layer not in self.layers:
            zeros = lambda: torch.zeros(p.num_experts, dtype=torch.float64)  # noqa: E731
            self.layers[p.layer] = dict(tokens=0, count=zeros(), weight_sum=zeros(),
                                        entropy_sum=0.0, entropy_tokens=0, sink_seen=0,
                                        sink_count=zeros(), sink_weight_sum=zeros(),
                                        top_k=p.top_k_index.shape[1])
        return self.layers[p.layer]

    def __call__(self, p: MoELayerPass) -> None:
        s = self._layer(p)
        num_experts = p.num_experts
        index = p.top_k_index.cpu()
        # Expert-parallel setups mark "no local expert" with index E: count only real experts.
        weights = (p.top_k_weights.cpu().double() * (index < num_experts)).flatten()
        flat = index.flatten().clamp_max(num_experts - 1)
        s["tokens"] += index.shape[0]
        s["count"] += torch.bincount(index.flatten(), minlength=num_experts)[:num_experts].double()
        s["weight_sum"].index_add_(0, flat, weights)
        probs = p.router_probabilities()
        if probs is not None:
            entropy = -(probs * probs.clamp_min(1e-30).log()).sum(dim=-1) / math.log(num_experts)
            s["entropy_sum"] += float(entropy.double().sum())
            s["entropy_tokens"] += entropy.numel()
        sink = torch.arange(0, index.shape[0], p.seq_len)
        sink_index = index[sink].flatten()
        s["sink_seen"] += sink.numel()
        s["sink_count"] += torch.bincount(sink_index, minlength=num_experts)[:num_experts].double()
        s["sink_weight_sum"].index_add_(0, sink_index.clamp_max(num_experts - 1),
                                        weights.view_as(index)[sink].flatten())

    def p_active(self, layer: int) -> list[float]:
        s = self.layers[layer]
        return (s["count"] / max(s["tokens"], 1)).tolist()

    def sink_experts(self, layer: int) -> list[int]:
        """Experts that received the first token of at least one text."""
        return [e for e, c in enumerate(self.layers[layer]["sink_count"].tolist()) if c > 0]

    def to_list(self) -> list[dict]:
        """Per MoE layer: counts, p_active, mean weights, entropies and the sink's routing."""
        out = []
        for layer in sorted(self.layers):
            s = self.layers[layer]
            count, sink_count = s["count"], s["sink_count"]
            usage = count / count.sum().clamp_min(1)
            num_experts = count.numel()
            usage_entropy = -(usage * usage.clamp_min(1e-30).log()).sum() / math.log(num_experts)
            out.append({
                "layer": layer,
                "tokens": s["tokens"],
                "top_k": s["top_k"],
                "count": [int(c) for c in count.tolist()],
                "p_active": self.p_active(layer),
                "mean_weight": _ratios(s["weight_sum"], count),
                # Mean per-token entropy of the router's distribution, / log(E): 0 = one expert
                # takes all, 1 = uniform.
                "router_entropy": (s["entropy_sum"] / s["entropy_tokens"]
                                   if s["entropy_tokens"] else None),
                # Entropy of the experts' share of the routed tokens, / log(E): load balance.
                "usage_entropy": float(usage_entropy),
                "sink": {
                    "texts": s["sink_seen"],
                    "p_routed": (sink_count / max(s["sink_seen"], 1)).tolist(),
                    "mean_weight": _ratios(s["sink_weight_sum"], sink_count),
                    "experts": self.sink_experts(layer),
                },
            })
        return out


def _ratios(total: torch.Tensor, count: torch.Tensor) -> list[float | None]:
    return [float(t / c) if c > 0 else None for t, c in zip(total.tolist(), count.tolist())]
