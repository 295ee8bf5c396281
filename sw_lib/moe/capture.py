"""Read what each MoE layer's experts see, with forward hooks, in float32.

transformers 5 fuses the experts into 3-D tensors, so there is no per-expert module to hook.
Instead we hook the experts block and take its inputs (the hidden states, the chosen experts and
their routing weights), the router's logits and the shared expert's down-projection input, then
recompute `act(gate) * up` and the down projection for each expert on the tokens routed to it.
A consumer gets one `MoELayerPass` per MoE layer and forward pass, and keeps only what it needs.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch
from torch import nn

from .. import arch, hooks


def _check_layout(module: nn.Module, layer: int) -> None:
    """We recompute experts as act(gate) * up with [gate; up] rows and no bias: refuse others."""
    layout = {"has_gate": True, "has_bias": False, "is_transposed": False, "is_concatenated": True}
    for name, expected in layout.items():
        if getattr(module, name, expected) != expected:
            raise NotImplementedError(
                f"experts of layer {layer} ({type(module).__name__}) have {name}="
                f"{getattr(module, name)}; sw_lib.moe reads only gated, [gate; up]-concatenated, "
                "bias-free fused experts")


@dataclass
class MoELayerPass:
    """What one MoE layer saw in one forward pass; tokens are the batch flattened row-major,
    so token t is position t % seq_len of sequence t // seq_len."""

    layer: int
    seq_len: int
    hidden: torch.Tensor  # [T, H] float32, the experts' input (after the layer norm)
    top_k_index: torch.Tensor  # [T, k] chosen experts
    top_k_weights: torch.Tensor  # [T, k] float32 routing weights
    router_logits: torch.Tensor | None  # [T, E] float32
    experts_module: nn.Module
    shared_module: nn.Module | None = None
    shared_input: torch.Tensor | None = None  # [T, I_shared] float32, shared down_proj input
    scoring: str = "softmax"
    _cache: dict = field(default_factory=dict, repr=False)

    @property
    def num_tokens(self) -> int:
        return self.hidden.shape[0]

    @property
    def num_experts(self) -> int:
        return self.experts_module.down_proj.shape[0]

    def routed_tokens(self, expert: int) -> torch.Tensor:
        """Indices of the tokens routed to `expert` (ascending)."""
        return (self.top_k_index == expert).any(dim=-1).nonzero().flatten()

    def expert_activations(self, expert: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(tokens [n], down_proj input act(gate)*up [n, I], down_proj output [n, H]), float32."""
        tokens = self.routed_tokens(expert)
        gate_up = self.experts_module.gate_up_proj[expert].float()
        down = self.experts_module.down_proj[expert].float()
        gate, up = (self.hidden[tokens] @ gate_up.t()).chunk(2, dim=-1)
        inner = self.experts_module.act_fn(gate) * up
        return tokens, inner, inner @ down.t()

    def shared_activations(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(down_proj input [T, I_shared], down_proj output [T, H]) of the shared expert, float32
        (before its sigmoid gate, where the family has one)."""
        weight = self.shared_module.down_proj.weight.float()
        return self.shared_input, self.shared_input @ weight.t()

    def router_probabilities(self) -> torch.Tensor | None:
        """[T, E] router distribution: softmax of the logits, or the sigmoid scores normalised to
        sum 1 (DeepSeek-V3 scores each expert independently)."""
        if self.router_logits is None:
            return None
        if self.scoring == "sigmoid":
            scores = self.router_logits.sigmoid()
            return scores / scores.sum(dim=-1, keepdim=True)
        return self.router_logits.softmax(dim=-1)


def _arg(args: tuple, kwargs: dict, index: int, name: str):
    return args[index] if len(args) > index else kwargs[name]


@contextlib.contextmanager
def capture_moe(model: nn.Module, on_pass: Callable[[MoELayerPass], None],
                layers: list[int] | None = None) -> Iterator[None]:
    """Call `on_pass` with each MoE layer's `MoELayerPass` during forward passes in the block.

    Hooks are removed on exit, exceptions included (`hooks.attached`).
    """
    spec = arch.family_of(model).moe
    layers = arch.moe_layers(model) if layers is None else layers
    forward, with_kwargs, pre = [], [], []

    def install(layer: int) -> None:
        experts = arch.experts(model, layer)
        _check_layout(experts, layer)
        shared = arch.shared_expert(model, layer)
        state: dict = {}

        def on_router(module, args, output):
            state["logits"] = output[0].detach().float()

        def on_experts(module, args, kwargs, output):
            state["hidden"] = _arg(args, kwargs, 0, "hidden_states").detach().float()
            state["index"] = _arg(args, kwargs, 1, "top_k_index").detach()
            state["weights"] = _arg(args, kwargs, 2, "top_k_weights").detach().float()

        def on_shared_down(module, args):
            state["shared"] = args[0].detach().float().reshape(-1, args[0].shape[-1])

        def on_block(module, args, output):
            seq_len = args[0].shape[-2] if args[0].dim() == 3 else args[0].shape[0]
            hidden = state.pop("hidden")
            layer_pass = MoELayerPass(
                layer=layer, seq_len=seq_len, hidden=hidden.reshape(-1, hidden.shape[-1]),
                top_k_index=state.pop("index").reshape(hidden.shape[0], -1),
                top_k_weights=state.pop("weights").reshape(hidden.shape[0], -1),
                router_logits=state.pop("logits", None), experts_module=experts,
                shared_module=shared, shared_input=state.pop("shared", None),
                scoring=spec.scoring)
            on_pass(layer_pass)

        forward.append((arch.router(model, layer), on_router))
        with_kwargs.append((experts, on_experts))
        if shared is not None:
            pre.append((shared.down_proj, on_shared_down))
        forward.append((arch.moe_block(model, layer), on_block))

    for layer in layers:
        install(layer)
    with hooks.attached(forward), hooks.attached(with_kwargs, kind="forward_kwargs"), \
            hooks.attached(pre, kind="pre"):
        yield


def batches_of(ids: torch.Tensor, batch_size: int | None, token_budget: int | None) -> list:
    """[n, S] ids split into batches of at most `batch_size` rows and `token_budget` tokens
    (one row at least): capturing keeps float32 copies of every MoE layer's inputs per pass."""
    rows = ids.shape[0] if batch_size is None else batch_size
    if token_budget is not None:
        rows = min(rows, max(1, token_budget // ids.shape[1]))
    return list(ids.split(max(1, rows)))


@torch.no_grad()
def run_batches(model: nn.Module, batches, on_pass: Callable[[MoELayerPass], None],
                progress: str | None = None) -> None:
    """Forward each [B, S] id batch through `model` with `on_pass` capturing every MoE layer."""
    from tqdm.auto import tqdm

    device = next(model.parameters()).device
    batches = list(batches)
    with capture_moe(model, on_pass):
        for ids in tqdm(batches, desc=progress, disable=progress is None or len(batches) < 2):
            model(ids.to(device), use_cache=False)
