"""Greedy generation for GSM8K: lm-evaluation-harness's `generate_until` text, batched.

What lm-eval computes per request: the context encoded with the tokenizer's defaults and cut
to its last `max_length - max_gen_toks` tokens; greedy tokens until one is an end-of-sequence
token, a stop string shows up in the generated text, or `max_gen_toks` exist; then the text
decoded without special tokens and cut at the first occurrence of each stop string (the
task's `until` plus the tokenizer's end-of-sequence text).

How this module gets the same text faster:
- requests are sorted by prompt length and batched under a token budget (rows x (longest
  prompt + max_gen_toks) cached key/value slots), so left padding stays small;
- a batch is left-padded and prefilled in one pass, with logits only at the last position;
  then each step feeds one token per row through the model's key/value cache, whose
  full-attention layers write into preallocated buffers (the default cache layer concatenates,
  copying the whole cache at every token);
- a row stops as soon as it emits an end-of-sequence token or its text (special tokens kept,
  as lm-eval's stopping criterion reads it) contains a stop string, and leaves the batch and
  its cache at once, so a long generation never drags finished rows along.
"""
from __future__ import annotations

from typing import Callable, Iterable

import torch
from torch import nn

from . import forward
from .batching import by_budget
from .prefix import decoder
from .tasks import GSM8K_EXTRACTORS, GenRequest, normalize_answer


def stop_strings(tokenizer, until: Iterable[str]) -> list[str]:
    stops = [s for s in until if s]
    eos = tokenizer.eos_token
    if eos and eos not in stops:
        stops.append(eos)
    return stops


def truncate_at_stops(text: str, stops: Iterable[str]) -> str:
    for stop in stops:
        text = text.split(stop)[0]
    return text


def eos_ids(model: nn.Module, tokenizer) -> set[int]:
    """Token ids that end a generation (the generation config's, as `generate` uses them)."""
    ids = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids = [] if ids is None else [ids] if isinstance(ids, int) else list(ids)
    if tokenizer.eos_token_id is not None:
        ids.append(tokenizer.eos_token_id)
    return set(ids)


def _buffered_layer_class():
    from transformers.cache_utils import DynamicLayer

    class BufferedLayer(DynamicLayer):
        """A full-attention cache layer in buffers sized once for the whole generation."""

        def __init__(self, capacity: int):
            super().__init__()
            self.capacity = capacity
            self.length = 0

        def allocate(self, like_keys: torch.Tensor, like_values: torch.Tensor, rows: int) -> None:
            self.device = like_keys.device
            shape = lambda t: (rows, t.shape[1], self.capacity, t.shape[3])  # noqa: E731
            self.key_buffer = like_keys.new_zeros(shape(like_keys))
            self.value_buffer = like_values.new_zeros(shape(like_values))
            self.is_initialized = True

        def lazy_initialization(self, key_states, value_states):
            self.allocate(key_states, value_states, key_states.shape[0])

        def update(self, key_states, value_states, *args, **kwargs):
            if not self.is_initialized:
                self.lazy_initialization(key_states, value_states)
            n = key_states.shape[-2]
            self.key_buffer[:, :, self.length:self.length + n] = key_states
            self.value_buffer[:, :, self.length:self.length + n] = value_states
            self.length += n
            self.views()
            return self.keys, self.values

        def views(self) -> None:
            self.keys = self.key_buffer[:, :, :self.length]
            self.values = self.value_buffer[:, :, :self.length]

        def get_seq_length(self) -> int:
            return self.length

        def batch_select_indices(self, indices: torch.Tensor) -> None:
            if self.is_initialized:
                self.key_buffer = self.key_buffer[indices]
                self.value_buffer = self.value_buffer[indices]
                self.views()

    return DynamicLayer, BufferedLayer


def new_cache(model: nn.Module, capacity: int):
    """A key/value cache for `capacity` tokens per row; sliding-window layers stay as they are."""
    from transformers import DynamicCache

    plain, buffered = _buffered_layer_class()
    cache = DynamicCache(config=model.config)
    cache.layers = [buffered(capacity) if type(layer) is plain else layer for layer in cache.layers]
    return cache


def _all_buffered(cache) -> bool:
    return all(hasattr(layer, "allocate") for layer in cache.layers)


def _next_tokens(model: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """Greedy choice from the last hidden state of each row (float32 logits, first maximum)."""
    return forward.head_logits(model, hidden).float().argmax(dim=-1)


def _prefill_rows(model: nn.Module, prompts: list[list[int]], width: int, cache) -> torch.Tensor:
    """Encode each prompt alone (no padding: the unbatched computation) and copy its keys and
    values right-aligned into its row of the shared buffers; the last hidden state per row."""
    from transformers import DynamicCache

    device = next(model.parameters()).device
    last = []
    for r, prompt in enumerate(prompts):
        own = DynamicCache()
        hidden = decoder(model)(input_ids=torch.tensor([prompt], device=device), cache=own,
                                use_cache=True).last_hidden_state
        last.append(hidden[0, -1])
        for layer, filled in zip(cache.layers, own.layers):
            if not layer.is_initialized:
                layer.allocate(filled.keys, filled.values, len(prompts))
            layer.key_buffer[r, :, width - len(prompt):width] = filled.keys[0]
            layer.value_buffer[r, :, width - len(prompt):width] = filled.values[0]
    for layer in cache.layers:
        layer.length = width
        layer.views()
    return torch.stack(last)


def _prefill_padded(model: nn.Module, prompts: list[list[int]], width: int, cache,
                    mask: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """Encode the left-padded prompts in one pass (families whose cache has sliding-window
    layers, kept by the model's own cache classes); the last hidden state per row."""
    ids = torch.zeros(len(prompts), width, dtype=torch.long)
    for r, p in enumerate(prompts):
        ids[r, width - len(p):] = torch.tensor(p)
    return decoder(model)(input_ids=ids.to(mask.device), attention_mask=mask,
                          position_ids=positions, cache=cache,
                          use_cache=True).last_hidden_state[:, -1]


def _finished(tokenizer, tokens: list[int], ends: set[int], stops: list[str]) -> bool:
    """lm-eval's stopping rule: an end-of-sequence token, or a stop string in the text."""
    if tokens[-1] in ends:
        return True
    text = tokenizer.decode(tokens, skip_special_tokens=False)
    return any(s in text for s in stops)


@torch.no_grad()
def greedy_batch(model: nn.Module, tokenizer, prompts: list[list[int]], stops: list[str],
                 max_gen_toks: int) -> list[str]:
    """Greedy continuations of token `prompts` (one batch), cut at the first stop string.

    Rows that finish stay in the batch (their tokens ignored) until a quarter of the rows
    has finished; then the batch and its cache are compacted (one copy instead of one per
    finished row)."""
    device = next(model.parameters()).device
    ends = eos_ids(model, tokenizer)
    width = max(len(p) for p in prompts)
    mask = torch.zeros(len(prompts), width, dtype=torch.long)
    for r, p in enumerate(prompts):
        mask[r, width - len(p):] = 1
    mask = mask.to(device)
    positions = (mask.cumsum(dim=1) - 1).clamp(min=0)
    cache = new_cache(model, width + max_gen_toks)
    if _all_buffered(cache):
        hidden = _prefill_rows(model, prompts, width, cache)
    else:
        hidden = _prefill_padded(model, prompts, width, cache, mask, positions)
    token = _next_tokens(model, hidden)
    position = positions[:, -1]
    generated: list[list[int]] = [[] for _ in prompts]
    rows = list(range(len(prompts)))  # prompt of each batch row, in the cache's order
    done = [False] * len(prompts)
    for step in range(max_gen_toks):
        for j, r in enumerate(rows):
            if not done[r]:
                generated[r].append(int(token[j]))
                done[r] = _finished(tokenizer, generated[r], ends, stops)
        alive = [j for j, r in enumerate(rows) if not done[r]]
        if not alive or step + 1 == max_gen_toks:
            break
        if 4 * (len(rows) - len(alive)) >= len(rows):  # compact: finished rows leave
            index = torch.tensor(alive, device=device)
            cache.batch_select_indices(index)
            mask, token, position = mask[index], token[index], position[index]
            rows = [rows[j] for j in alive]
        mask = torch.cat([mask, mask.new_ones(len(rows), 1)], dim=1)
        position = position + 1
        hidden = decoder(model)(input_ids=token[:, None], attention_mask=mask,
                                position_ids=position[:, None], cache=cache,
                                use_cache=True).last_hidden_state[:, -1]
        token = _next_tokens(model, hidden)
    return [truncate_at_stops(tokenizer.decode(g, skip_special_tokens=True), stops)
            for g in generated]


def generate(model: nn.Module, tokenizer, requests: list[GenRequest], until: Iterable[str],
             max_gen_toks: int, token_budget: int, max_rows: int | None = None,
             on_batch: Callable[[int], None] | None = None) -> dict[int, str]:
    """Generated text for every request, by doc_id (batches by prompt length, longest first)."""
    stops = stop_strings(tokenizer, until)
    keep = forward.max_length(model) - max_gen_toks
    if keep < 1:
        raise ValueError(f"max_gen_toks={max_gen_toks} leaves no room for a prompt in the model's "
                         f"{forward.max_length(model)}-token window")
    prompts = {r.doc_id: tokenizer.encode(r.context)[-keep:] for r in requests}
    texts: dict[int, str] = {}
    for batch in by_budget(list(prompts), lambda d: len(prompts[d]) + max_gen_toks, token_budget,
                           max_rows):
        for doc_id, text in zip(batch, greedy_batch(model, tokenizer, [prompts[d] for d in batch],
                                                    stops, max_gen_toks)):
            texts[doc_id] = text
        if on_batch:
            on_batch(len(batch))
    return texts


def item_result(request: GenRequest, text: str, metrics: Iterable[str]) -> dict:
    """Extract the answer each metric's filter finds and compare it with the reference."""
    gold = normalize_answer(request.gold)
    pred = {m: GSM8K_EXTRACTORS[m](text) for m in metrics}
    return {"doc_id": request.doc_id, "gold": gold, "pred": pred,
            "correct": {m: int(normalize_answer(pred[m]) == gold) for m in metrics},
            "generation": text}
