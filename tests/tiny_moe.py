"""Plant super experts and expert super weights in tiny random MoE models.

`sw_lib.tiny.tiny_model("mixtral")` (and the other MoE types) builds the tiny model; this module
plants, the way `tiny.plant_super_weight` does for dense MLPs: MLP channel `column` of expert
`expert` is made to spike on token 0 (its gate and up rows aligned with token 0's input to the
experts), the router is made to send token 0 to that expert (its router row aligned with the same
input), and one large down-projection weight [row, column] turns the spike into a huge output on
residual channel `row`. The expert then is both a super expert and the home of a super weight.

Token 0's input to a layer depends only on token 0 (causal attention), so the plant also fires
on any text that starts with the same token.
"""
from __future__ import annotations

import torch
from torch import nn

from sw_lib import arch


def _moe_inputs(model: nn.Module, layer: int, input_ids: torch.Tensor) -> torch.Tensor:
    """The (normalised) hidden states [S, H] that enter `layer`'s MoE block, float32."""
    captured = {}

    def hook(module, args):
        captured.setdefault("h", args[0].reshape(-1, args[0].shape[-1]).detach().float())

    handle = arch.moe_block(model, layer).register_forward_pre_hook(hook)
    try:
        with torch.no_grad():
            model(input_ids, use_cache=False)
    finally:
        handle.remove()
    return captured["h"]


@torch.no_grad()
def plant_expert_super_weight(model: nn.Module, layer: int, row: int, column: int,
                              input_ids: torch.Tensor, expert: int | None = None,
                              shared: bool = False, value: float = 6.0, spike: float = 200.0,
                              route_logit: float = 20.0) -> None:
    """Make channel `column` of routed `expert` (or of the shared expert, `shared=True`) spike
    to about `spike` on token 0 of `input_ids`, route token 0 to that expert, and plant
    down_proj[row, column] = `value` (so the output on channel `row` is about spike * value)."""
    if (expert is None) == (not shared):
        raise ValueError("give exactly one of expert=<int> or shared=True")
    hidden = _moe_inputs(model, layer, input_ids[:1])
    h = hidden[0]
    direction = h / h.norm() ** 2  # direction . h == 1
    gate_up_row = direction * spike ** 0.5  # silu(p) * p ~ p**2 for large p
    if shared:
        mlp = arch.shared_expert(model, layer)
        if mlp is None:
            raise ValueError(f"layer {layer} of this {arch.family_of(model).name} model has no "
                             "shared expert")
        for proj in (mlp.gate_proj, mlp.up_proj):
            proj.weight[column] = gate_up_row.to(proj.weight.dtype)
        mlp.down_proj.weight[row, column] = value
        return
    experts = arch.experts(model, layer)
    gate_up = experts.gate_up_proj
    intermediate = experts.down_proj.shape[2]
    gate_up[expert, column] = gate_up_row.to(gate_up.dtype)  # gate half
    gate_up[expert, intermediate + column] = gate_up_row.to(gate_up.dtype)  # up half
    # Route token 0 (and not the others, on average) to the expert: the router row follows
    # token 0's input minus the mean of the other tokens' inputs.
    router = arch.router(model, layer)
    target = h - hidden[1:].mean(dim=0) if hidden.shape[0] > 1 else h
    router.weight[expert] = (target / (target @ h) * route_logit).to(router.weight.dtype)
    experts.down_proj[expert, row, column] = value
