"""Forward passes that compute only what an evaluation reads.

Three savings over a plain `model(input_ids).logits`:
- the decoder runs without the LM head, and the head (a fifth of a 135M model's compute) is
  applied only at the positions whose next-token log-probability is needed;
- several sequences that share a context run as one packed row with a 4-D attention mask and
  explicit position ids (the context is encoded once; see multiple_choice.py);
- a token prefix shared by many rows (MMLU k-shot: the description and the same solved
  examples for every question of a subject) is encoded once into a key/value cache that every
  packed row of the batch attends to (`encode_prefix`, `packed_hidden(..., past=...)`).

These rely on how a family builds its logits, masks and caches, so `fast_path_ok(model)` and
`shared_prefix_ok(model)` check them once per model against the plain forward on a small
input; families that fail a check are evaluated without that saving (exact, slower).
"""
from __future__ import annotations

import warnings

import torch
from torch import nn

from .prefix import Plan, decoder, run_decoder

# Positions whose logits are materialised at once (memory: chunk x vocab floats).
HEAD_CHUNK = 1024


def max_length(model: nn.Module) -> int:
    """The model's context window in tokens (2048 when its config does not say)."""
    config = model.config
    for name in ("max_position_embeddings", "n_positions", "max_sequence_length"):
        if getattr(config, name, None):
            return int(getattr(config, name))
    return 2048


def head_logits(model: nn.Module, hidden: torch.Tensor, out: torch.Tensor | None = None
                ) -> torch.Tensor:
    """Logits for hidden states [..., H], as the causal LM's own forward would compute them;
    written into `out` (2-D hidden, an nn.Linear head) when given, with the same values."""
    head = model.get_output_embeddings()
    if out is None:
        logits = head(hidden)
    elif head.bias is None:
        logits = torch.mm(hidden, head.weight.t(), out=out)
    else:
        logits = torch.addmm(head.bias, hidden, head.weight.t(), out=out)
    cap = getattr(model.config, "final_logit_softcapping", None)
    if cap:
        logits = logits.div_(cap).tanh_().mul_(cap)
    return logits


def token_logprobs(model: nn.Module, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log p(targets[i] | hidden[i]) in float32, the head applied chunk by chunk."""
    out = torch.empty(targets.shape[0], dtype=torch.float32, device=hidden.device)
    head = model.get_output_embeddings()
    reuse = hidden.device.type == "cpu" and isinstance(head, nn.Linear)
    for start in range(0, targets.shape[0], HEAD_CHUNK):
        stop = start + HEAD_CHUNK
        if reuse:
            logp = _logprobs_in_place(model, head, hidden[start:stop])
        else:
            logp = torch.log_softmax(head_logits(model, hidden[start:stop]).float(), dim=-1)
        out[start:stop] = logp.gather(1, targets[start:stop, None]).squeeze(1)
    return out


def _logprobs_in_place(model: nn.Module, head: nn.Linear, hidden: torch.Tensor) -> torch.Tensor:
    """What `log_softmax(head_logits(model, hidden).float())` gives, bit for bit, computed in
    buffers kept on the model. On a CPU a fresh chunk of logits (1024 x 49152 floats: 200 MB)
    is a fresh memory map whose page faults cost as much as the log-softmax itself."""
    rows = hidden.shape[0]
    logits = head_logits(model, hidden,
                         out=_buffer(model, head.weight.dtype, rows, head.weight.shape[0],
                                     hidden.device))
    if logits.dtype != torch.float32:
        logits = _buffer(model, torch.float32, rows, logits.shape[1], hidden.device).copy_(logits)
    return torch.log_softmax(logits, dim=-1, out=logits)


def _buffer(model: nn.Module, dtype: torch.dtype, rows: int, vocab: int, device) -> torch.Tensor:
    """A [rows, vocab] view of the model's reusable head buffer of this dtype."""
    buffers = model.__dict__.setdefault("_sw_head_buffers", {})
    buf = buffers.get(dtype)
    if buf is None or buf.shape[0] < rows or buf.shape[1] != vocab or buf.device != device:
        buf = buffers[dtype] = torch.empty(max(rows, HEAD_CHUNK), vocab, dtype=dtype,
                                           device=device)
    return buf[:rows]


def packed_mask(segments: torch.Tensor, positions: torch.Tensor, dtype: torch.dtype,
                prefix_len: int = 0) -> torch.Tensor:
    """Additive [B, 1, L, prefix_len + L] mask for rows of a shared context plus branches.

    segments: [B, L] with 0 for the shared context, j > 0 for branch j, -1 for padding;
    positions: [B, L] position ids. A token sees the cached prefix (its first `prefix_len`
    keys), the context and its own branch, causally; padding sees only itself (so no softmax
    row is empty).
    """
    seg_q, seg_k = segments[:, :, None], segments[:, None, :]
    pos_q, pos_k = positions[:, :, None], positions[:, None, :]
    allowed = (seg_k == 0) | (seg_k == seg_q)
    allowed &= (pos_k <= pos_q) & (seg_k >= 0) & (seg_q >= 0)
    allowed |= torch.eye(segments.shape[1], dtype=torch.bool, device=segments.device)
    if prefix_len:
        sees_prefix = (seg_q >= 0).expand(-1, -1, prefix_len)
        allowed = torch.cat([sees_prefix, allowed], dim=2)
    mask = torch.zeros(allowed.shape, dtype=dtype, device=segments.device)
    mask.masked_fill_(~allowed, torch.finfo(dtype).min)
    return mask[:, None]


def encode_prefix(model: nn.Module, tokens: list[int]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Keys and values of every layer for `tokens` (positions 0..P-1), for packed rows to reuse."""
    from transformers import DynamicCache

    device = next(model.parameters()).device
    cache = DynamicCache()
    decoder(model)(input_ids=torch.tensor([tokens], device=device), cache=cache,
                   use_cache=True)
    return [(layer.keys, layer.values) for layer in cache.layers]


def _batch_cache(past: list[tuple[torch.Tensor, torch.Tensor]], rows: int):
    from transformers import DynamicCache

    return DynamicCache(ddp_cache_data=[(k.expand(rows, -1, -1, -1), v.expand(rows, -1, -1, -1))
                                        for k, v in past])


def packed_hidden(model: nn.Module, plan: Plan | None, input_ids: torch.Tensor,
                  segments: torch.Tensor, positions: torch.Tensor,
                  past: list[tuple[torch.Tensor, torch.Tensor]] | None = None) -> torch.Tensor:
    """Last hidden states [B, L, H] of packed rows (see packed_mask), after `past` if given.

    A batch that attends to a cached prefix runs every layer (`plan` is not used for it). Rows
    without branches must start at position 0 when there is no `past` (as `_packed_batch`
    builds them)."""
    if not past and not bool((segments > 0).any()):
        # No branches (every choice one token: MMLU): right-padded causal rows, which the
        # model's own causal attention computes without a 4-D mask (lm-eval's rows); real
        # tokens never see the padding after them, and their positions are 0, 1, ...
        return run_decoder(model, plan, input_ids=input_ids, use_cache=False)
    dtype = next(model.parameters()).dtype
    prefix_len = past[0][0].shape[2] if past else 0
    mask = packed_mask(segments, positions, dtype, prefix_len)
    if past:
        return run_decoder(model, None, input_ids=input_ids, attention_mask=mask,
                           position_ids=positions, use_cache=True,
                           cache=_batch_cache(past, input_ids.shape[0]))
    return run_decoder(model, plan, input_ids=input_ids, attention_mask=mask,
                       position_ids=positions, use_cache=False)


def _sliding_window(config) -> int | None:
    window = getattr(config, "sliding_window", None)
    if not window or getattr(config, "use_sliding_window", True) is False:
        return None
    return int(window)


def packing_allowed(model: nn.Module, longest: int) -> bool:
    """Custom 4-D masks work with eager/sdpa attention and no sliding window in reach."""
    config = model.config
    if getattr(config, "_attn_implementation", "eager") not in ("eager", "sdpa"):
        return False
    window = _sliding_window(config)
    return window is None or longest <= window


def _tolerance(dtype: torch.dtype) -> float:
    return 1e-3 if dtype == torch.float32 else 5e-2


def _probe(model: nn.Module):
    """A small random prefix and three branches, with the plain forward's log-probs of each
    branch token (the reference every fast path must reproduce)."""
    device = next(model.parameters()).device
    vocab = model.get_output_embeddings().weight.shape[0]
    g = torch.Generator().manual_seed(0)
    prefix = torch.randint(0, vocab, (6,), generator=g).tolist()
    branches = [torch.randint(0, vocab, (n,), generator=g).tolist() for n in (3, 1, 2)]
    reference = []
    for branch in branches:
        ids = torch.tensor([prefix + branch], device=device)
        logp = torch.log_softmax(model(ids).logits[0].float(), dim=-1)
        reference.append(logp[len(prefix) - 1:-1].gather(1, ids[0, len(prefix):, None])[:, 0])
    return prefix, branches, torch.cat(reference)


def _packed_probe(model: nn.Module, prefix: list[int], branches: list[list[int]],
                  cached: int) -> torch.Tensor:
    """The probe's branch log-probs from one packed row whose first `cached` prefix tokens
    come from a key/value cache."""
    device = next(model.parameters()).device
    past = encode_prefix(model, prefix[:cached]) if cached else None
    context = prefix[cached:]
    tokens, segs, pos = list(context), [0] * len(context), list(range(cached, len(prefix)))
    rows, targets = [], []
    for j, branch in enumerate(branches, start=1):
        rows.append(len(context) - 1)
        for i, t in enumerate(branch[:-1]):  # the last token of a branch is not needed as input
            rows.append(len(tokens))
            tokens.append(t)
            segs.append(j)
            pos.append(len(prefix) + i)
        targets.extend(branch)
    tokens, segs, pos = tokens + [0], segs + [-1], pos + [0]  # a padding slot, as in batches
    as_tensor = lambda x: torch.tensor([x], device=device)  # noqa: E731
    hidden = packed_hidden(model, None, as_tensor(tokens), as_tensor(segs), as_tensor(pos), past)
    return token_logprobs(model, hidden[0, rows], torch.tensor(targets, device=device))


@torch.no_grad()
def _check(model: nn.Module, attribute: str, cached: int, what: str) -> bool:
    ok = getattr(model, attribute, None)
    if ok is not None:
        return ok
    dtype = next(model.parameters()).dtype
    try:
        prefix, branches, reference = _probe(model)
        fast = _packed_probe(model, prefix, branches, cached)
        ok = bool(torch.allclose(fast, reference, atol=_tolerance(dtype), rtol=0))
        if not ok:
            warnings.warn(f"{what} of {type(model).__name__} does not match its plain forward; "
                          "evaluating without it (exact, slower)", stacklevel=2)
    except Exception as err:  # a family whose base model refuses 4-D masks, position ids or caches
        warnings.warn(f"{what} unavailable for {type(model).__name__} ({err}); "
                      "evaluating without it", stacklevel=2)
        ok = False
    setattr(model, attribute, ok)
    return ok


def fast_path_ok(model: nn.Module) -> bool:
    """Packed rows + head-only logits give the plain forward's log-probs (checked once per model)."""
    return _check(model, "_sw_eval_fast_path", 0, "packed evaluation")


def shared_prefix_ok(model: nn.Module) -> bool:
    """Packed rows after a cached prefix give the plain forward's log-probs (checked once)."""
    return fast_path_ok(model) and _check(model, "_sw_eval_shared_prefix", 4,
                                          "shared-prefix evaluation")
