"""Test support: tiny random models of every supported family, super weights planted on request.

Used by the tests (exhaustive architecture coverage in seconds) and handy for trying the
notebooks without a real model. A planted super weight is made the way real ones look: one MLP
channel `column` spikes on the first token, and one large down-projection weight [row, column]
turns it into a huge output on residual channel `row`.
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from sw_lib import arch

TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=512, head_dim=16)

# Per model type: config overrides for a tiny instance (keys transformers' configs accept).
TINY_OVERRIDES: dict[str, dict] = {
    "gpt2": dict(n_embd=64, n_inner=128, n_layer=4, n_head=4, n_positions=512),
    "gpt_neox": dict(rotary_pct=0.25, use_parallel_residual=True),
    "gemma2": dict(sliding_window=64, query_pre_attn_scalar=16),
    "gemma3_text": dict(sliding_window=64, query_pre_attn_scalar=16),
    # Mixture-of-experts families: 8 experts of width 32, top-2 routing.
    "mixtral": dict(num_local_experts=8, num_experts_per_tok=2, intermediate_size=32),
    "olmoe": dict(num_experts=8, num_experts_per_tok=2, intermediate_size=32),
    "qwen2_moe": dict(num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32,
                      shared_expert_intermediate_size=64),
    "qwen3_moe": dict(num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32),
    "deepseek_v2": dict(n_routed_experts=8, num_experts_per_tok=2, moe_intermediate_size=32,
                        n_shared_experts=1, first_k_dense_replace=1, q_lora_rank=None,
                        kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16,
                        head_dim=8, num_key_value_heads=4),
    "deepseek_v3": dict(n_routed_experts=8, num_experts_per_tok=2, moe_intermediate_size=32,
                        n_shared_experts=1, first_k_dense_replace=1, n_group=2, topk_group=1,
                        q_lora_rank=32, kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8,
                        v_head_dim=16, head_dim=8, num_key_value_heads=4),
}


def tiny_config(model_type: str, vocab_size: int, **overrides):
    from transformers import AutoConfig

    arch.family_for_model_type(model_type)
    kwargs = dict(TINY) if model_type != "gpt2" else {}
    kwargs.update(TINY_OVERRIDES.get(model_type, {}))
    # Token ids inside the (borrowed) vocabulary: SmolLM2's bos=1, eos=pad=2.
    kwargs.update(vocab_size=vocab_size, tie_word_embeddings=False,
                  bos_token_id=1, eos_token_id=2, pad_token_id=2)
    kwargs.update(overrides)
    return AutoConfig.for_model(model_type, **kwargs)


def tiny_model(model_type: str, vocab_size: int = 49152, seed: int = 0, **overrides) -> nn.Module:
    """A randomly initialised float32 model of `model_type` with a few small layers."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    config = tiny_config(model_type, vocab_size, **overrides)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    return model.eval()


def _mlp_input_modules(model: nn.Module, layer: int) -> list[nn.Module]:
    """The MLP's linear maps whose outputs produce the down projection's input channels."""
    down = arch.down_proj(model, layer)
    mlp_path = arch.family_of(model).down_proj.rsplit(".", 1)[0]
    mlp = arch.decoder_layers(model)[layer].get_submodule(mlp_path)
    return [m for m in mlp.modules()
            if m is not down and hasattr(m, "weight") and m.weight is not None
            and m.weight.dim() == 2 and not isinstance(m, nn.Embedding)]


def _first_token_mlp_input(model: nn.Module, layer: int, input_ids: torch.Tensor) -> torch.Tensor:
    """The (normalised) hidden state that enters `layer`'s MLP at token 0."""
    first = _mlp_input_modules(model, layer)[0]
    captured = {}
    handle = first.register_forward_pre_hook(lambda m, args: captured.setdefault("h", args[0]))
    try:
        with torch.no_grad():
            model(input_ids)
    finally:
        handle.remove()
    return captured["h"][0, 0].float()


@torch.no_grad()
def plant_super_weight(model: nn.Module, layer: int, row: int, column: int,
                       input_ids: torch.Tensor, value: float = 6.0,
                       extra_rows: dict[int, float] | None = None,
                       spike: float = 200.0) -> None:
    """Make MLP channel `column` of `layer` spike on token 0 and plant W[row, column] = value.

    The rows of the up (and gate) projections that produce channel `column` are aligned with
    token 0's MLP input, scaled so the channel reaches about `spike` there (act(p) * p for a
    gated MLP, act(p) otherwise); `extra_rows` plants further weights of the same column.
    """
    h = _first_token_mlp_input(model, layer, input_ids)
    intermediate = arch.down_proj_matrix(model, layer).shape[1]
    modules = _mlp_input_modules(model, layer)
    rows = sum(m.weight.numel() // h.numel() for m in modules if m.weight.numel() % h.numel() == 0)
    gated = rows >= 2 * intermediate
    pre_activation = spike ** 0.5 if gated else spike
    direction = h / h.norm() ** 2 * pre_activation  # direction . h == pre_activation
    for module in modules:
        weight = module.weight.t() if arch.family_of(model).transposed else module.weight
        if weight.shape[1] != direction.numel():
            continue
        # A fused gate_up projection holds 2*I rows: channel `column` in both halves.
        for offset in range(0, weight.shape[0], intermediate):
            weight[offset + column] = direction.to(weight.dtype)
            bias = getattr(module, "bias", None)
            if bias is not None:
                bias[offset + column] = 0.0
    matrix = arch.down_proj_matrix(model, layer)
    matrix[row, column] = value
    for extra_row, extra_value in (extra_rows or {}).items():
        matrix[extra_row, column] = extra_value


@torch.no_grad()
def rely_on_channel(model: nn.Module, row: int, shared_channel: int = 3,
                    head_scale: float = 20.0) -> None:
    """Make a tiny random model need a massive activation on residual channel `row`, as a real
    model needs its super activation; call it before `plant_super_weight`.

    - Every token's embedding gets 1.0 on `shared_channel`: a direction all hidden states share,
      so a super weight planted afterwards (aligned with the prompt's first token) spikes on
      every token of any text, the reference text included.
    - The LM head is scaled by `head_scale` (confident, random predictions) and reads nothing
      from `row`. While `row` holds a massive value the final norm shrinks every other channel
      and the predictions stay near uniform; without it the confident random predictions
      return and the loss rises by nats. A second weight writing `row` in a later layer adds
      to the massive value: removing it weakens the shrinking a little (a mild effect).
    """
    embeddings = model.get_input_embeddings().weight
    embeddings[:, shared_channel] = 1.0
    head = model.get_output_embeddings().weight  # [vocab, hidden]
    head.mul_(head_scale)
    head[:, row] = 0.0


# Where `plant_verdict_examples` plants, and the verdict each one earns.
VERDICT_EXAMPLES = {"super_weight": (1, 37, 101), "contributor": (2, 37, 55),
                    "no_effect": (3, 20, 80)}


def plant_verdict_examples(model: nn.Module, input_ids: torch.Tensor) -> dict[str, tuple]:
    """Plant one weight of each verdict in a tiny model of four layers with a final `norm`
    (Llama-like), at the coordinates of VERDICT_EXAMPLES (returned):

    - the model needs a massive activation on residual channel 37 (`rely_on_channel`);
      L1 [37, 101] makes it: zeroing it is catastrophic (super_weight);
    - L2 [37, 55] adds as much again: zeroing it leaves L1's half, a mild effect (contributor);
    - L3 [20, 80] spikes on channel 20, which the final norm cuts off (gain 0): its only path
      is a small change of the norm's scale, no more than ordinary weights of its column
      do (no_effect).
    """
    (l1, row, c1), (l2, _, c2), (l3, cut, c3) = VERDICT_EXAMPLES.values()
    rely_on_channel(model, row=row)
    plant_super_weight(model, l1, row, c1, input_ids, value=1.0)
    plant_super_weight(model, l2, row, c2, input_ids, value=1.0)
    plant_super_weight(model, l3, cut, c3, input_ids, value=0.3)
    with torch.no_grad():
        model.model.norm.weight[cut] = 0.0
    return dict(VERDICT_EXAMPLES)


@torch.no_grad()
def set_post_norm_gain(model: nn.Module, layer: int, row: int, gain: float) -> None:
    """Give channel `row` of `layer`'s post-MLP norm (Gemma 2 / 3) the effective gain `gain`,
    whichever convention the norm uses (Gemma scales by 1 + weight)."""
    norm = arch.post_mlp_norm(model, layer)
    if norm is None:
        raise ValueError(f"layer {layer} of this {arch.family_of(model).name} model has no "
                         "post-MLP norm")
    saved = norm.weight[row].clone()
    norm.weight[row] = 0.0
    probe = torch.ones(1, norm.weight.numel(), dtype=norm.weight.dtype)
    offset = float(norm(probe)[0, row])  # the gain a zero weight gives: 0 or 1
    norm.weight[row] = saved if gain is None else gain - offset


def save_tiny(model: nn.Module, tokenizer, folder: str | Path) -> Path:
    """Save a tiny model with its tokenizer as a folder `load_model` accepts."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@torch.no_grad()
def plant_first_token_super_weight(model: nn.Module, layer: int, row: int, column: int,
                                   input_ids: torch.Tensor, value: float = 6.0,
                                   spike: float = 200.0) -> None:
    """A super weight whose only effect is through the first token's activation: in a Llama
    with a ReLU-gated MLP (`hidden_act="relu"`), MLP channel `column` of `layer` is `spike` at
    token 0 of `input_ids` and exactly 0 at every other token (the gate row solves
    g . h_0 = sqrt(spike), g . h_t = -1 for t > 0; ReLU shuts the rest), and W[row, column] =
    `value`. Zeroing the weight then changes the down projection's output at token 0 alone."""
    mlp = arch.decoder_layers(model)[layer].mlp
    captured = {}
    handle = mlp.gate_proj.register_forward_pre_hook(lambda m, args: captured.setdefault("h", args[0]))
    try:
        model(input_ids)
    finally:
        handle.remove()
    h = captured["h"][0].double()  # [tokens, hidden]
    target = torch.full((h.shape[0], 1), -1.0, dtype=torch.float64)
    target[0] = spike ** 0.5
    gate = torch.linalg.lstsq(h, target, driver="gelsd").solution[:, 0]  # exact: tokens < hidden
    mlp.gate_proj.weight[column] = gate.float()
    mlp.up_proj.weight[column] = (h[0] / h[0].norm() ** 2 * spike ** 0.5).float()
    arch.down_proj_matrix(model, layer)[row, column] = value
