"""Forward passes that compute only what an evaluation reads.

Two savings over a plain `model(input_ids).logits`:
- the decoder runs without the LM head, and the head (a fifth of a 135M model's compute) is
  applied only at the positions whose next-token log-probability is needed;
- several sequences that share a prefix run as one packed row with a 4-D attention mask and
  explicit position ids (the prefix is encoded once; see multiple_choice.py).

Both rely on how a family builds its logits and masks, so `fast_path_ok(model)` checks them
once per model against the plain forward on a small input; families that fail the check are
evaluated with plain forwards instead (exact, slower).
"""
from __future__ import annotations

import warnings

import torch
from torch import nn

from .prefix import run_decoder, suspended

# Positions whose logits are materialised at once (memory: chunk x vocab floats).
HEAD_CHUNK = 1024


def decoder(model: nn.Module) -> nn.Module:
    """The causal LM's base model (embeddings + layers + final norm, no LM head)."""
    return getattr(model, model.base_model_prefix)


def head_logits(model: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """Logits for hidden states [N, H], as the causal LM's own forward would compute them."""
    logits = model.get_output_embeddings()(hidden)
    cap = getattr(model.config, "final_logit_softcapping", None)
    if cap:
        logits = torch.tanh(logits / cap) * cap
    return logits


def token_logprobs(model: nn.Module, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log p(targets[i] | hidden[i]) in float32, the head applied chunk by chunk."""
    out = torch.empty(targets.shape[0], dtype=torch.float32, device=hidden.device)
    for start in range(0, targets.shape[0], HEAD_CHUNK):
        stop = start + HEAD_CHUNK
        logits = head_logits(model, hidden[start:stop]).float()
        logp = torch.log_softmax(logits, dim=-1)
        out[start:stop] = logp.gather(1, targets[start:stop, None]).squeeze(1)
    return out


def packed_mask(segments: torch.Tensor, positions: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Additive [B, 1, L, L] mask for rows of a shared prefix plus independent branches.

    segments: [B, L] with 0 for the shared prefix, j > 0 for branch j, -1 for padding;
    positions: [B, L] position ids. A token sees the prefix and its own branch, causally;
    padding sees only itself (so no softmax row is empty).
    """
    seg_q, seg_k = segments[:, :, None], segments[:, None, :]
    pos_q, pos_k = positions[:, :, None], positions[:, None, :]
    allowed = (seg_k == 0) | (seg_k == seg_q)
    allowed &= (pos_k <= pos_q) & (seg_k >= 0) & (seg_q >= 0)
    allowed |= torch.eye(segments.shape[1], dtype=torch.bool, device=segments.device)
    mask = torch.zeros(allowed.shape, dtype=dtype, device=segments.device)
    mask.masked_fill_(~allowed, torch.finfo(dtype).min)
    return mask[:, None]


def packed_hidden(model: nn.Module, input_ids: torch.Tensor, segments: torch.Tensor,
                  positions: torch.Tensor) -> torch.Tensor:
    """Last hidden states [B, L, H] of packed rows (see packed_mask)."""
    dtype = next(model.parameters()).dtype
    mask = packed_mask(segments, positions, dtype)
    return run_decoder(model, input_ids=input_ids, attention_mask=mask, position_ids=positions,
                       use_cache=False)


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


@torch.no_grad()
def fast_path_ok(model: nn.Module) -> bool:
    """Packed rows + head-only logits give the plain forward's log-probs (checked once per model)."""
    cached = getattr(model, "_sw_eval_fast_path", None)
    if cached is not None:
        return cached
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    vocab = model.get_output_embeddings().weight.shape[0]
    g = torch.Generator().manual_seed(0)
    prefix = torch.randint(0, vocab, (6,), generator=g).tolist()
    branches = [torch.randint(0, vocab, (n,), generator=g).tolist() for n in (3, 1, 2)]
    try:
        # Plain forward of each prefix + branch: the reference.
        reference = []
        for branch in branches:
            ids = torch.tensor([prefix + branch], device=device)
            logp = torch.log_softmax(model(ids).logits[0].float(), dim=-1)
            reference.append(logp[len(prefix) - 1:-1].gather(1, ids[0, len(prefix):, None])[:, 0])
        # The same from one packed row (the last token of each branch is not needed as input).
        tokens, segs, pos, rows, targets = list(prefix), [0] * len(prefix), list(range(len(prefix))), [], []
        for j, branch in enumerate(branches, start=1):
            rows.append(len(prefix) - 1)
            for i, t in enumerate(branch[:-1]):
                rows.append(len(tokens))
                tokens.append(t)
                segs.append(j)
                pos.append(len(prefix) + i)
            targets.extend(branch)
        tokens, segs, pos = tokens + [0], segs + [-1], pos + [0]  # a padding slot, as in batches
        with suspended():
            hidden = packed_hidden(model, torch.tensor([tokens], device=device),
                                   torch.tensor([segs], device=device),
                                   torch.tensor([pos], device=device))
        fast = token_logprobs(model, hidden[0, rows], torch.tensor(targets, device=device))
        ok = torch.allclose(fast, torch.cat(reference), atol=_tolerance(dtype), rtol=0)
    except Exception as err:  # a family whose base model refuses 4-D masks or position ids
        warnings.warn(f"packed evaluation unavailable for {type(model).__name__} ({err}); "
                      "using plain forward passes")
        model._sw_eval_fast_path = False
        return False
    if not ok:
        warnings.warn(f"packed evaluation of {type(model).__name__} does not match its plain "
                      "forward; using plain forward passes (exact, slower)")
    model._sw_eval_fast_path = ok
    return ok
