"""Plant super experts and expert super weights in tiny random MoE models.

`tiny.tiny_model("mixtral")` (and the other MoE types) builds the tiny model; this module
plants, the way `tiny.plant_super_weight` does for dense MLPs: MLP channel `column` of expert
`expert` is made to spike on token 0 (its gate and up rows aligned with token 0's input to the
experts), the router is made to send token 0 to that expert (its router row aligned with the same
input), and one large down-projection weight [row, column] turns the spike into a huge output on
residual channel `row`. The expert then is both a super expert and the home of a super weight.

Token 0's input to a layer depends only on token 0 (causal attention), so the plant also fires
on any text that starts with the same token. `plant_super_expert` makes a model that needs its
super expert on every token of any text (the tiny stand-in for Su et al.'s finding), and
`write_gguf` saves a tiny Qwen3-MoE as a GGUF file transformers reads.
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


@torch.no_grad()
def plant_super_expert(model: nn.Module, input_ids: torch.Tensor, layer: int = 1,
                       expert: int = 3, row: int = 37, column: int = 5, spike: float = 200.0,
                       route_logit: float = 8.0, spread: float = 30.0) -> dict:
    """Make a tiny MoE model depend on one super expert, on every token of any text.

    `tiny.rely_on_channel` gives every token a shared embedding direction and makes the model
    need a massive activation on residual channel `row` (without it the scaled, random LM head
    predicts confidently and wrongly); the other embedding channels are scaled by `spread` so
    the router still sends different tokens to different experts. Channel `column` of the routed
    `expert` of `layer` then spikes to about `spike` on every token (its gate and up rows follow
    the mean input of the experts on `input_ids`), the router sends every token to it, and
    down_proj[row, column] = 1 writes the spike to `row`: the expert is a super expert and holds
    an expert super weight. Skipping it removes the massive activation (the loss rises by
    nats); skipping an ordinary expert changes only what the final norm shrinks to nearly
    nothing. Returns {"layer", "expert", "shared": False, "row", "column"}."""
    import tiny

    tiny.rely_on_channel(model, row=row)
    embeddings = model.get_input_embeddings().weight
    shared = embeddings[:, 3].clone()  # rely_on_channel's shared direction
    embeddings.mul_(spread)
    embeddings[:, 3] = shared
    mean = _moe_inputs(model, layer, input_ids[:1]).mean(dim=0)
    direction = mean / mean.norm() ** 2  # direction . mean == 1
    experts = arch.experts(model, layer)
    intermediate = experts.down_proj.shape[2]
    for offset in (0, intermediate):  # gate half, up half: silu(p) * p ~ p**2
        experts.gate_up_proj[expert, offset + column] = direction * spike ** 0.5
    arch.router(model, layer).weight[expert] = direction * route_logit
    experts.down_proj[expert, row, column] = 1.0
    return {"layer": layer, "expert": expert, "shared": False, "row": row, "column": column}


def _byte_symbols() -> list[str]:
    """GPT-2's byte-level alphabet: printable bytes stand for themselves, the others for the
    code points from 256 on, in byte order."""
    printable = set(range(33, 127)) | set(range(161, 173)) | set(range(174, 256))
    out, extra = [], 0
    for b in range(256):
        if b in printable:
            out.append(chr(b))
        else:
            out.append(chr(256 + extra))
            extra += 1
    return out


# HF tensor names (after "model.layers.N.") and their GGUF names in a Qwen3-MoE block.
_GGUF_BLOCK = {"input_layernorm.weight": "attn_norm", "post_attention_layernorm.weight": "ffn_norm",
               "self_attn.q_proj.weight": "attn_q", "self_attn.k_proj.weight": "attn_k",
               "self_attn.v_proj.weight": "attn_v", "self_attn.o_proj.weight": "attn_output",
               "self_attn.q_norm.weight": "attn_q_norm", "self_attn.k_norm.weight": "attn_k_norm",
               "mlp.gate.weight": "ffn_gate_inp", "mlp.experts.down_proj": "ffn_down_exps"}
_GGUF_TOP = {"model.embed_tokens.weight": "token_embd", "model.norm.weight": "output_norm",
             "lm_head.weight": "output"}
GGUF_VOCAB = 256 + 4  # the byte alphabet, one merge ("Th") and three control tokens


def gguf_qwen3_moe(**overrides) -> nn.Module:
    """A tiny Qwen3-MoE that survives a GGUF round trip: transformers reads neither the experts'
    width nor norm_topk_prob from a qwen3moe GGUF, so both keep the values it assumes (768, true)."""
    import tiny

    return tiny.tiny_model("qwen3_moe", vocab_size=GGUF_VOCAB, moe_intermediate_size=768,
                           norm_topk_prob=True, **overrides)


@torch.no_grad()
def write_gguf(model: nn.Module, path) -> None:
    """Write a tiny Qwen3-MoE (from `gguf_qwen3_moe`) as a float32 GGUF file with a byte-level
    BPE tokenizer, with the gguf package's GGUFWriter (the fused gate_up experts tensor is
    written as llama.cpp's separate gate and up tensors)."""
    import gguf

    cfg = model.config
    writer = gguf.GGUFWriter(str(path), "qwen3moe")
    writer.add_name("tiny qwen3moe")
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(cfg.num_key_value_heads)
    writer.add_key_length(cfg.head_dim)
    writer.add_value_length(cfg.head_dim)
    writer.add_rope_freq_base(cfg.rope_parameters["rope_theta"])
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_expert_count(cfg.num_experts)
    writer.add_expert_used_count(cfg.num_experts_per_tok)
    writer.add_vocab_size(cfg.vocab_size)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(_byte_symbols() + ["Th", "<|endoftext|>", "<|im_start|>", "<|im_end|>"])
    writer.add_token_types([1] * 257 + [3] * 3)  # normal, then control
    writer.add_token_merges(["T h"])
    writer.add_bos_token_id(257)
    writer.add_eos_token_id(257)
    for name, tensor in model.state_dict().items():
        array = tensor.float().numpy()
        if name in _GGUF_TOP:
            writer.add_tensor(f"{_GGUF_TOP[name]}.weight", array)
            continue
        _, _, layer, rest = name.split(".", 3)
        if rest == "mlp.experts.gate_up_proj":  # [E, 2I, H]: gate rows, then up rows
            half = array.shape[1] // 2
            writer.add_tensor(f"blk.{layer}.ffn_gate_exps.weight", array[:, :half].copy())
            writer.add_tensor(f"blk.{layer}.ffn_up_exps.weight", array[:, half:].copy())
        else:
            writer.add_tensor(f"blk.{layer}.{_GGUF_BLOCK[rest]}.weight", array)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
