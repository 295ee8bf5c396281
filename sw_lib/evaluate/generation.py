"""Greedy generation for GSM8K: lm-evaluation-harness's `generate_until` text, batched.

What lm-eval computes per request: the context encoded with the tokenizer's defaults and cut
to its last `max_length - max_gen_toks` tokens; greedy tokens until one is an end-of-sequence
token, a stop string shows up in the generated text, or `max_gen_toks` exist; then the text
decoded without special tokens and cut at the first occurrence of each stop string (the
task's `until` plus the tokenizer's end-of-sequence text).

How this module gets the same text faster:
- each prompt is prefilled alone (no padding: the unbatched computation), with logits only at
  its last position; under an ablation it starts at the edited layer from what the baseline
  kept (prefix.run_prompt);
- up to `batch_size` prompts decode together, one token per row per step, through a key/value
  cache whose full-attention layers live in preallocated buffers (the default cache layer
  concatenates, copying the whole cache at every token); each row has its own positions and
  attention mask, prompts right-aligned at the end of the filled columns;
- a row stops as soon as it emits an end-of-sequence token or its text (special tokens kept,
  as lm-eval's stopping criterion reads it) contains a stop string; when a quarter of the rows
  has finished, the batch is rebuilt without them and the next prompts (longest first) join,
  so a 256-token straggler never drags finished rows along;
- families whose cache has sliding-window layers decode left-padded batches through the
  model's own cache classes instead (finished rows leave; no joining).
"""
from __future__ import annotations

from typing import Callable, Iterable

import torch
from torch import nn

from . import forward
from .batching import DEFAULT_BATCH_SIZE, by_budget
from .prefix import Plan, decoder, run_prompt
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


def _prefill_alone(model: nn.Module, prompt: list[int], plan: Plan | None = None):
    """Encode one prompt alone (the unbatched computation): its last hidden state and the
    keys and values of every layer (`plan`: start at the edited layer, prefix.run_prompt)."""
    from transformers import DynamicCache

    device = next(model.parameters()).device
    own = DynamicCache()
    hidden = run_prompt(model, plan, torch.tensor([prompt], device=device), own)
    return hidden[0, -1], [(layer.keys[0], layer.values[0]) for layer in own.layers]


def _finished(tokenizer, tokens: list[int], ends: set[int], stops: list[str],
              max_gen_toks: int) -> bool:
    """lm-eval's stopping rule: an end-of-sequence token, a stop string in the text (decoded
    with special tokens, as its stopping criterion reads it), or the token limit."""
    if tokens[-1] in ends or len(tokens) >= max_gen_toks:
        return True
    text = tokenizer.decode(tokens, skip_special_tokens=False)
    return any(s in text for s in stops)


class _Rows:
    """The rows decoding together through one key/value cache (full-attention layers only).

    Each prompt is prefilled alone and its keys and values placed right-aligned at the end of
    the cache's filled columns; every row has its own position ids, and its attention mask
    hides the columns before its prompt. A step feeds one token per row. When a quarter of
    the rows has finished (or none is left), the cache is rebuilt: finished rows and the
    columns no row still reads are dropped, and the next prompts join, so the batch stays full
    and a long generation never drags finished rows along.
    """

    def __init__(self, model, tokenizer, stops, max_gen_toks: int, max_rows: int,
                 on_done: Callable[[int], None] | None = None, plan: Plan | None = None):
        self.model, self.tokenizer, self.stops, self.on_done = model, tokenizer, stops, on_done
        self.plan = plan
        self.ends = eos_ids(model, tokenizer)
        self.max_gen_toks, self.max_rows = max_gen_toks, max_rows
        self.device = next(model.parameters()).device
        self.cache = new_cache(model, 1)
        self.rows: list = []  # request key of each batch row, in the cache's order
        self.first: list[int] = []  # first cache column of each row's prompt
        self.length = 0  # filled columns
        self.mask = self.token = self.position = None
        self.generated: dict = {}
        self.done: dict = {}

    def run(self, prompts: dict) -> dict:
        """Generated token ids per key of `prompts` (key -> prompt tokens)."""
        queue = sorted(prompts, key=lambda k: -len(prompts[k]))  # longest first
        while queue or self.rows:
            finished = sum(self.done[r] for r in self.rows)
            if not self.rows or 4 * finished >= len(self.rows):
                alive = [j for j, r in enumerate(self.rows) if not self.done[r]]
                joining = queue[:self.max_rows - len(alive)]
                queue = queue[len(joining):]
                self._rebuild(alive, [(k, prompts[k]) for k in joining])
                if not self.rows:
                    continue
            self._step()
        return self.generated

    def _record(self, key, token: int) -> None:
        self.generated[key].append(token)
        self.done[key] = _finished(self.tokenizer, self.generated[key], self.ends, self.stops,
                                   self.max_gen_toks)
        if self.done[key] and self.on_done:
            self.on_done(1)

    def _step(self) -> None:
        self.mask = torch.cat([self.mask, self.mask.new_ones(len(self.rows), 1)], dim=1)
        self.position = self.position + 1
        hidden = decoder(self.model)(input_ids=self.token[:, None], attention_mask=self.mask,
                                     position_ids=self.position[:, None], cache=self.cache,
                                     use_cache=True).last_hidden_state[:, -1]
        self.length += 1
        self.token = _next_tokens(self.model, hidden)
        for j, key in enumerate(self.rows):
            if not self.done[key]:
                self._record(key, int(self.token[j]))

    def _rebuild(self, keep: list[int], joining: list) -> None:
        """Rows `keep` (batch indices) stay, the `joining` (key, prompt) pairs are added."""
        new = []
        for key, prompt in joining:
            hidden, kv = _prefill_alone(self.model, prompt, self.plan)
            self.generated[key] = []
            self._record(key, int(_next_tokens(self.model, hidden[None])[0]))
            if not self.done[key]:  # a prompt whose first token ends it never joins
                new.append((key, prompt, kv))
        if not keep and not new:
            self.rows, self.first = [], []
            return
        start = min((self.first[j] for j in keep), default=self.length)
        kept = self.length - start
        length = max([kept] + [len(p) for _, p, _ in new])
        shift = length - self.length  # kept columns move by this much
        rows = len(keep) + len(new)
        capacity = length + self.max_gen_toks
        index = torch.tensor(keep, dtype=torch.long, device=self.device)
        mask = torch.zeros(rows, length, dtype=torch.long, device=self.device)
        if keep:
            mask[:len(keep), length - kept:] = self.mask[index, start:]
        for i, (_, prompt, _) in enumerate(new):
            mask[len(keep) + i, length - len(prompt):] = 1
        for layer_index, layer in enumerate(self.cache.layers):
            like_k, like_v = (layer.key_buffer, layer.value_buffer) if keep else new[0][2][layer_index]
            keys = like_k.new_zeros(rows, like_k.shape[-3], capacity, like_k.shape[-1])
            values = like_v.new_zeros(rows, like_v.shape[-3], capacity, like_v.shape[-1])
            if keep:
                keys[:len(keep), :, length - kept:length] = layer.key_buffer[index, :, start:self.length]
                values[:len(keep), :, length - kept:length] = layer.value_buffer[index, :, start:self.length]
            for i, (_, prompt, kv) in enumerate(new):
                keys[len(keep) + i, :, length - len(prompt):length] = kv[layer_index][0]
                values[len(keep) + i, :, length - len(prompt):length] = kv[layer_index][1]
            layer.key_buffer, layer.value_buffer, layer.length = keys, values, length
            layer.is_initialized = True
            layer.views()
        as_long = lambda x: torch.tensor(x, dtype=torch.long, device=self.device)  # noqa: E731
        self.token = torch.cat([self.token[index] if keep else as_long([]),
                                as_long([self.generated[k][-1] for k, _, _ in new])])
        self.position = torch.cat([self.position[index] if keep else as_long([]),
                                   as_long([len(p) - 1 for _, p, _ in new])])
        self.first = [self.first[j] + shift for j in keep] + [length - len(p) for _, p, _ in new]
        self.rows = [self.rows[j] for j in keep] + [k for k, _, _ in new]
        self.mask, self.length = mask, length


@torch.no_grad()
def _padded_batch(model: nn.Module, tokenizer, prompts: list[list[int]], stops: list[str],
                  max_gen_toks: int) -> list[list[int]]:
    """Families whose cache has sliding-window layers: the batch is left-padded and prefilled
    in one pass through the model's own cache classes; finished rows leave the batch."""
    device = next(model.parameters()).device
    ends = eos_ids(model, tokenizer)
    width = max(len(p) for p in prompts)
    ids = torch.zeros(len(prompts), width, dtype=torch.long)
    mask = torch.zeros(len(prompts), width, dtype=torch.long)
    for r, p in enumerate(prompts):
        ids[r, width - len(p):] = torch.tensor(p)
        mask[r, width - len(p):] = 1
    ids, mask = ids.to(device), mask.to(device)
    position = (mask.cumsum(dim=1) - 1).clamp(min=0)
    cache = new_cache(model, width + max_gen_toks)
    hidden = decoder(model)(input_ids=ids, attention_mask=mask, position_ids=position,
                            cache=cache, use_cache=True).last_hidden_state[:, -1]
    token, position = _next_tokens(model, hidden), position[:, -1]
    generated: list[list[int]] = [[] for _ in prompts]
    rows = list(range(len(prompts)))  # prompt of each batch row
    while True:
        for j, r in enumerate(rows):
            generated[r].append(int(token[j]))
        alive = [j for j, r in enumerate(rows)
                 if not _finished(tokenizer, generated[r], ends, stops, max_gen_toks)]
        if not alive:
            return generated
        if len(alive) < len(rows):
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


@torch.no_grad()
def generate_tokens(model: nn.Module, tokenizer, prompts: dict, stops: list[str],
                    max_gen_toks: int, token_budget: int, max_rows: int | None = None,
                    on_done: Callable[[int], None] | None = None,
                    plan: Plan | None = None) -> dict:
    """Greedy token ids after each prompt (key -> prompt tokens), by key. `plan`: prompts
    seen by an earlier condition start at the edited layer (prefix.run_prompt)."""
    if _all_buffered(new_cache(model, 1)):
        rows = max_rows or DEFAULT_BATCH_SIZE
        return _Rows(model, tokenizer, stops, max_gen_toks, rows, on_done, plan).run(prompts)
    # Padded prefill holds rows x longest prompt at once: the token budget bounds it (with at
    # least one row), and batch_size the rows.
    out = {}
    for batch in by_budget(list(prompts), lambda k: len(prompts[k]), token_budget,
                           max_rows or DEFAULT_BATCH_SIZE):
        for key, tokens in zip(batch, _padded_batch(model, tokenizer, [prompts[k] for k in batch],
                                                    stops, max_gen_toks)):
            out[key] = tokens
        if on_done:
            on_done(len(batch))
    return out


def generate(model: nn.Module, tokenizer, requests: list[GenRequest], until: Iterable[str],
             max_gen_toks: int, token_budget: int, max_rows: int | None = None,
             on_done: Callable[[int], None] | None = None,
             plan: Plan | None = None) -> dict[int, str]:
    """Generated text for every request, by doc_id, cut at the first stop string."""
    stops = stop_strings(tokenizer, until)
    keep = forward.max_length(model) - max_gen_toks
    if keep < 1:
        raise ValueError(f"max_gen_toks={max_gen_toks} leaves no room for a prompt in the model's "
                         f"{forward.max_length(model)}-token window")
    prompts = {r.doc_id: tokenizer.encode(r.context)[-keep:] for r in requests}
    tokens = generate_tokens(model, tokenizer, prompts, stops, max_gen_toks, token_budget,
                             max_rows, on_done, plan)
    return {doc_id: truncate_at_stops(tokenizer.decode(t, skip_special_tokens=True), stops)
            for doc_id, t in tokens.items()}


def item_result(request: GenRequest, text: str, metrics: Iterable[str]) -> dict:
    """Extract the answer each metric's filter finds and compare it with the reference."""
    gold = normalize_answer(request.gold)
    pred = {m: GSM8K_EXTRACTORS[m](text) for m in metrics}
    return {"doc_id": request.doc_id, "gold": gold, "pred": pred,
            "correct": {m: int(normalize_answer(pred[m]) == gold) for m in metrics},
            "generation": text}
