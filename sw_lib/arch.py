"""The one place that knows module names per model family.

Every other module asks this one for a model's decoder layers, MLP down projections (with the
weight orientation), and MoE blocks. Adding a family is one `Family(...)` entry in FAMILIES.

Vocabulary: a super weight sits at (layer, row, column), where row is the down projection's
output channel (a residual-stream channel) and column its input channel (an MLP channel),
whatever the storage layout. For MoE experts add `expert` (fused tensor index).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from . import offload


class UnsupportedArchitectureError(ValueError):
    """The model's family is not in FAMILIES."""


@dataclass(frozen=True)
class MoESpec:
    """Where a family's mixture-of-experts block keeps its parts (paths relative to a layer).

    The fused layout of transformers 5: experts.gate_up_proj [E, 2I, H], experts.down_proj
    [E, H, I], router weight [E, H]. Layers whose `block` has no `experts` are dense.
    """

    block: str = "mlp"
    router: str = "gate"
    experts: str = "experts"
    shared_expert: str | None = None
    shared_expert_gate: str | None = None
    # How the router turns logits into scores: "softmax" over experts, or an independent
    # "sigmoid" per expert (DeepSeek-V3). Used for routing entropy only; which experts a
    # token uses is read from the experts block's own inputs.
    scoring: str = "softmax"


@dataclass(frozen=True)
class Family:
    name: str
    model_types: tuple[str, ...]
    layers: str = "model.layers"  # dotted path from the CausalLM to the decoder ModuleList
    down_proj: str = "mlp.down_proj"  # dotted path from a decoder layer
    # True when the module stores its weight as [in, out] (GPT-2's Conv1D) instead of [out, in].
    transposed: bool = False
    # A norm with a learned gain between the MLP output and the residual add (dotted path from
    # a decoder layer), where the family has one; looked up per layer, so a model type of the
    # family without it (Gemma v1) simply has none.
    post_mlp_norm: str | None = None
    moe: MoESpec | None = None


FAMILIES: tuple[Family, ...] = (
    Family("llama", ("llama",)),
    Family("mistral", ("mistral",)),
    Family("qwen2", ("qwen2",)),
    Family("qwen3", ("qwen3",)),
    Family("olmo", ("olmo",)),
    Family("olmo2", ("olmo2",)),
    Family("gemma", ("gemma", "gemma2", "gemma3_text"), post_mlp_norm="post_feedforward_layernorm"),
    Family("phi3", ("phi3",)),  # fused gate_up_proj; down_proj is a plain Linear
    Family("gpt2", ("gpt2",), layers="transformer.h", down_proj="mlp.c_proj", transposed=True),
    Family("gpt_neox", ("gpt_neox",), layers="gpt_neox.layers", down_proj="mlp.dense_4h_to_h"),
    # Mixture-of-experts families (fused experts).
    Family("mixtral", ("mixtral",), moe=MoESpec()),
    Family("qwen2_moe", ("qwen2_moe",),
           moe=MoESpec(shared_expert="shared_expert", shared_expert_gate="shared_expert_gate")),
    Family("olmoe", ("olmoe",), moe=MoESpec()),
    Family("qwen3_moe", ("qwen3_moe",), moe=MoESpec()),
    Family("deepseek_v2", ("deepseek_v2",), moe=MoESpec(shared_expert="shared_experts")),
    Family("deepseek_v3", ("deepseek_v3",),
           moe=MoESpec(shared_expert="shared_experts", scoring="sigmoid")),
)


def supported_model_types() -> list[str]:
    return sorted(t for f in FAMILIES for t in f.model_types)


def family_for_model_type(model_type: str) -> Family:
    for family in FAMILIES:
        if model_type in family.model_types:
            return family
    raise UnsupportedArchitectureError(
        f"Unsupported architecture '{model_type}'; supported model types: "
        f"{', '.join(supported_model_types())} (add one Family entry in sw_lib/arch.py)"
    )


def family_of(model: nn.Module) -> Family:
    return family_for_model_type(getattr(model.config, "model_type", type(model).__name__))


def _get(root: nn.Module, path: str):
    obj = root
    for part in path.split("."):
        obj = getattr(obj, part)
    return obj


def _find(root: nn.Module, path: str | None):
    if path is None:
        return None
    try:
        return _get(root, path)
    except AttributeError:
        return None


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    return _get(model, family_of(model).layers)


def num_layers(model: nn.Module) -> int:
    return len(decoder_layers(model))


def is_moe_layer(model: nn.Module, layer: int) -> bool:
    spec = family_of(model).moe
    if spec is None:
        return False
    block = _find(decoder_layers(model)[layer], spec.block)
    return block is not None and _find(block, spec.experts) is not None


def down_proj(model: nn.Module, layer: int) -> nn.Module:
    """The dense MLP down projection of `layer` (raises for an MoE layer: use experts())."""
    return _get(decoder_layers(model)[layer], family_of(model).down_proj)


def post_mlp_norm(model: nn.Module, layer: int) -> nn.Module | None:
    """The norm (with a learned gain) that the MLP's output passes before the residual add
    (Gemma 2 / 3: post_feedforward_layernorm), or None where the layer has none."""
    return _find(decoder_layers(model)[layer], family_of(model).post_mlp_norm)


def dense_layers(model: nn.Module) -> list[int]:
    """Layers with a dense down projection (all of them in a dense model)."""
    return [i for i in range(num_layers(model)) if not is_moe_layer(model, i)]


def down_proj_matrix(model: nn.Module, layer: int) -> torch.Tensor:
    """The down projection weight as an [out=row, in=column] view sharing storage."""
    weight = offload.parameter(down_proj(model, layer), "weight")
    return weight.t() if family_of(model).transposed else weight


# --- mixture-of-experts seam -------------------------------------------------------------


def moe_block(model: nn.Module, layer: int) -> nn.Module:
    spec = family_of(model).moe
    if spec is None or not is_moe_layer(model, layer):
        raise ValueError(f"layer {layer} of this {family_of(model).name} model is not an MoE layer")
    return _get(decoder_layers(model)[layer], spec.block)


def router(model: nn.Module, layer: int) -> nn.Module:
    return _get(moe_block(model, layer), family_of(model).moe.router)


def experts(model: nn.Module, layer: int) -> nn.Module:
    """The fused experts module: gate_up_proj [E, 2I, H], down_proj [E, H, I]."""
    return _get(moe_block(model, layer), family_of(model).moe.experts)


def shared_expert(model: nn.Module, layer: int) -> nn.Module | None:
    return _find(moe_block(model, layer), family_of(model).moe.shared_expert)


def shared_expert_gate(model: nn.Module, layer: int) -> nn.Module | None:
    return _find(moe_block(model, layer), family_of(model).moe.shared_expert_gate)


def is_moe_model(model: nn.Module) -> bool:
    return bool(moe_layers(model))


def moe_layers(model: nn.Module) -> list[int]:
    """Layers with a mixture-of-experts block (dense first layers of DeepSeek, Qwen's
    `mlp_only_layers` and `decoder_sparse_step` gaps are left out)."""
    return [i for i in range(num_layers(model)) if is_moe_layer(model, i)]


def num_experts(model: nn.Module, layer: int) -> int:
    """Routed experts of an MoE layer (the fused tensors' first dimension)."""
    return experts(model, layer).down_proj.shape[0]


def experts_per_token(model: nn.Module) -> int:
    """top_k: routed experts each token uses."""
    return int(model.config.num_experts_per_tok)


def weight_matrix(model: nn.Module, layer: int, expert: int | None = None,
                  shared: bool = False) -> torch.Tensor:
    """The [row, column] matrix that holds a super weight, as a view sharing storage.

    expert=None, shared=False: the dense down projection of `layer`;
    expert=e: experts.down_proj[e] of an MoE layer; shared=True: the shared expert's down_proj.
    """
    if shared:
        module = shared_expert(model, layer)
        if module is None:
            raise ValueError(f"layer {layer} has no shared expert")
        return offload.parameter(module.down_proj, "weight")
    if expert is not None:
        return experts(model, layer).down_proj[expert]
    return down_proj_matrix(model, layer)
