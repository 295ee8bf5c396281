"""Forward passes that compute only what an evaluation reads.

Three savings over a plain `model(input_ids).logits`:
- the decoder runs without the LM head, and the head (a fifth of a 135M model's compute) is
  applied only at the positions whose next-token log-probability is needed;
- several sequences that share a context run as one packed row with a 4-D attention mask and
  explicit position ids (the context is encoded once; see multiple_choice.py);
- token prefixes shared by several rows (MMLU: a subject's description, and in k-shot the
  same solved examples for every question of the subject) are encoded once into a key/value
  cache; each packed row of a batch attends to its own prefix in it (`encode_prefixes`,
  `packed_hidden(..., past=...)`).

These rely on how a family builds its logits, masks and caches, so `fast_path_ok(model)` and
`shared_prefix_ok(model)` check them once per model against the plain forward on a small
input; families that fail a check are evaluated without that saving (exact, slower).
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
from torch import nn

from .batching import by_budget
from .prefix import Plan, batch_digest, decoder, run_decoder

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
                prefix_lengths: torch.Tensor | None = None) -> torch.Tensor:
    """Additive [B, 1, L, P + L] mask for rows of a shared context plus branches.

    segments: [B, L] with 0 for the shared context, j > 0 for branch j, -1 for padding;
    positions: [B, L] position ids; prefix_lengths: [B], how many of the P cached prefix keys
    (P = the longest) belong to each row. A token sees its row's cached prefix, the context
    and its own branch, causally; padding sees only itself (so no softmax row is empty).
    """
    seg_q, seg_k = segments[:, :, None], segments[:, None, :]
    pos_q, pos_k = positions[:, :, None], positions[:, None, :]
    allowed = (seg_k == 0) | (seg_k == seg_q)
    allowed &= (pos_k <= pos_q) & (seg_k >= 0) & (seg_q >= 0)
    allowed |= torch.eye(segments.shape[1], dtype=torch.bool, device=segments.device)
    if prefix_lengths is not None:
        slots = torch.arange(int(prefix_lengths.max()), device=segments.device)
        sees_prefix = (seg_q >= 0) & (slots[None, None, :] < prefix_lengths[:, None, None])
        allowed = torch.cat([sees_prefix, allowed], dim=2)
    mask = torch.zeros(allowed.shape, dtype=dtype, device=segments.device)
    mask.masked_fill_(~allowed, torch.finfo(dtype).min)
    return mask[:, None]


@dataclass
class Prefixes:
    """Token prefixes encoded once, for the packed rows that start after them.

    layers[g][i] holds prefix g's keys and values at layer i, [kv_heads, len, head_dim]."""

    tokens: list[list[int]]
    layers: list[list[tuple[torch.Tensor, torch.Tensor]]]

    def for_rows(self, which: list[int]) -> RowPrefixes | None:
        """The cached prefix of each row of a batch: row b starts after prefix which[b], or
        at position 0 when which[b] is -1; right-padded to the longest (a row never attends
        to the slots past its own prefix). None when no row has a prefix."""
        lengths = [len(self.tokens[g]) if g >= 0 else 0 for g in which]
        width = max(lengths)
        if not width:
            return None
        rows_of: dict[int, list[int]] = {}  # one copy per prefix and layer, not per row
        for b, g in enumerate(which):
            if g >= 0:
                rows_of.setdefault(g, []).append(b)
        layers = []
        for i, (k0, _) in enumerate(self.layers[next(iter(rows_of))]):
            keys = k0.new_zeros(len(which), k0.shape[0], width, k0.shape[2])
            values = torch.zeros_like(keys)
            for g, rows in rows_of.items():
                index = torch.tensor(rows, device=keys.device)
                n = len(self.tokens[g])
                keys[index, :, :n] = self.layers[g][i][0]
                values[index, :, :n] = self.layers[g][i][1]
            layers.append((keys, values))
        tokens = torch.zeros(len(which), width, dtype=torch.long)
        for g, rows in rows_of.items():
            tokens[rows, :len(self.tokens[g])] = torch.tensor(self.tokens[g])
        lengths = torch.tensor(lengths)
        digest = batch_digest({"prefix_tokens": tokens, "prefix_lengths": lengths})
        return RowPrefixes(layers, lengths.to(keys.device), digest)


@dataclass
class RowPrefixes:
    """Per-row cached prefixes of one batch (see Prefixes.for_rows)."""

    layers: list[tuple[torch.Tensor, torch.Tensor]]
    lengths: torch.Tensor  # [B]
    digest: str  # of the rows' prefix tokens: recorded layer inputs depend on them

    def cache(self):
        from transformers import DynamicCache

        return DynamicCache(ddp_cache_data=list(self.layers))


def encode_prefixes(model: nn.Module, prefixes: list[list[int]], token_budget: int
                    ) -> Prefixes:
    """Keys and values of every layer for each prefix (positions 0..P-1), encoded in batches
    of similar length within `token_budget` padded tokens."""
    from transformers import DynamicCache

    device = next(model.parameters()).device
    layers: list[list[tuple[torch.Tensor, torch.Tensor]]] = [[] for _ in prefixes]
    for batch in by_budget(list(range(len(prefixes))), lambda g: len(prefixes[g]), token_budget):
        ids = torch.zeros(len(batch), len(prefixes[batch[0]]), dtype=torch.long)
        for row, g in enumerate(batch):  # right-padded: causal tokens never see what follows
            ids[row, :len(prefixes[g])] = torch.tensor(prefixes[g])
        cache = DynamicCache()
        decoder(model)(input_ids=ids.to(device), cache=cache, use_cache=True)
        for row, g in enumerate(batch):
            n = len(prefixes[g])
            layers[g] = [(layer.keys[row, :, :n], layer.values[row, :, :n])
                         for layer in cache.layers]
    return Prefixes([list(p) for p in prefixes], layers)


def packed_hidden(model: nn.Module, plan: Plan | None, input_ids: torch.Tensor,
                  segments: torch.Tensor, positions: torch.Tensor,
                  past: RowPrefixes | None = None) -> torch.Tensor:
    """Last hidden states [B, L, H] of packed rows (see packed_mask), each after its cached
    prefix in `past` if given. Rows without branches must start at position 0 when there is
    no `past` (as `_packed_batch` builds them)."""
    if past is None and not bool((segments > 0).any()):
        # No branches (every choice one token: MMLU): right-padded causal rows, which the
        # model's own causal attention computes without a 4-D mask (lm-eval's rows); real
        # tokens never see the padding after them, and their positions are 0, 1, ...
        return run_decoder(model, plan, input_ids=input_ids, use_cache=False)
    dtype = next(model.parameters()).dtype
    mask = packed_mask(segments, positions, dtype, past.lengths if past is not None else None)
    if past is not None:
        # Layers skipped under `plan` leave their cached prefix unread; the recorded layer
        # inputs are keyed by the prefixes' tokens as well as the rows'.
        return run_decoder(model, plan, key=past.digest, input_ids=input_ids,
                           attention_mask=mask, position_ids=positions, use_cache=True,
                           cache=past.cache())
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
                  cached: tuple[int, ...]) -> torch.Tensor:
    """The probe's branch log-probs from packed rows, one per entry of `cached`: row r has
    its first cached[r] prefix tokens in a key/value cache (rows of different cached lengths
    share one batch, as in `multiple_choice`) and a padding slot at its end."""
    device = next(model.parameters()).device
    past = (encode_prefixes(model, [prefix[:n] for n in cached], 10 ** 6)
            .for_rows(list(range(len(cached)))) if any(cached) else None)
    rows_ids, rows_segs, rows_pos, picks, targets = [], [], [], [], []
    for r, n in enumerate(cached):
        context = prefix[n:]
        tokens, segs, pos = list(context), [0] * len(context), list(range(n, len(prefix)))
        for j, branch in enumerate(branches, start=1):
            picks.append((r, len(context) - 1))
            for i, t in enumerate(branch[:-1]):  # a branch's last token is not needed as input
                picks.append((r, len(tokens)))
                tokens.append(t)
                segs.append(j)
                pos.append(len(prefix) + i)
            targets.extend(branch)
        rows_ids.append(tokens)
        rows_segs.append(segs)
        rows_pos.append(pos)
    width = max(len(t) for t in rows_ids) + 1  # every row ends in padding, as in batches
    for row, fill in ((rows_ids, 0), (rows_segs, -1), (rows_pos, 0)):
        for values in row:
            values.extend([fill] * (width - len(values)))
    as_tensor = lambda x: torch.tensor(x, device=device)  # noqa: E731
    hidden = packed_hidden(model, None, as_tensor(rows_ids), as_tensor(rows_segs),
                           as_tensor(rows_pos), past)
    rows, cols = zip(*picks)
    return token_logprobs(model, hidden[as_tensor(rows), as_tensor(cols)], as_tensor(targets))


@torch.no_grad()
def _check(model: nn.Module, attribute: str, cached: tuple[int, ...], what: str) -> bool:
    ok = getattr(model, attribute, None)
    if ok is not None:
        return ok
    dtype = next(model.parameters()).dtype
    try:
        prefix, branches, reference = _probe(model)
        fast = _packed_probe(model, prefix, branches, cached)
        ok = bool(torch.allclose(fast, reference.repeat(len(cached)), atol=_tolerance(dtype),
                                 rtol=0))
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
    return _check(model, "_sw_eval_fast_path", (0,), "packed evaluation")


def shared_prefix_ok(model: nn.Module) -> bool:
    """Packed rows after a cached prefix give the plain forward's log-probs (checked once)."""
    return fast_path_ok(model) and _check(model, "_sw_eval_shared_prefix", (4, 2),
                                          "shared-prefix evaluation")
