"""Batched, cached greedy generation equals the unbatched, uncached step-by-step computation.

The reference runs one full forward pass per new token for one prompt at a time and applies
lm-eval's stopping rule on its own (an end-of-sequence token, or a stop string in the text
decoded with special tokens), then cuts the text at the stop strings. Stop strings are taken
from the models' own outputs so that rows stop at different steps: finished rows leave the
batch (compaction) while others go on.
"""
from __future__ import annotations

import pytest
import torch
from conftest import make_tiny

from sw_lib import data
from sw_lib.evaluate import generation
from sw_lib.evaluate.tasks import gsm8k_prompt

MAX_NEW = 12


@torch.no_grad()
def reference(lm, prompt: list[int], stops: list[str], max_new: int) -> tuple[str, int]:
    """(text, tokens generated) for one prompt, no cache, no batch."""
    ids, new = list(prompt), []
    ends = {lm.model.generation_config.eos_token_id, lm.tokenizer.eos_token_id}
    for _ in range(max_new):
        token = int(lm.model(torch.tensor([ids])).logits[0, -1].float().argmax())
        ids.append(token)
        new.append(token)
        if token in ends or any(s in lm.tokenizer.decode(new, skip_special_tokens=False)
                                for s in stops):
            break
    text = lm.tokenizer.decode(new, skip_special_tokens=True)
    for stop in stops:
        text = text.split(stop)[0]
    return text, len(new)


def prompts_of(tokenizer, n: int) -> list[list[int]]:
    """0-shot GSM8K prompts of different lengths (some longer than gemma2's 64-token window)."""
    rows = [row for _, row in data.select_items("gsm8k/test", n).items]
    return [tokenizer.encode(gsm8k_prompt(row, [])) for row in rows]


def stops_from_outputs(lm, prompts: list[list[int]]) -> list[str]:
    """Two stop strings that the model itself produces early in two of the prompts."""
    first = reference(lm, prompts[0], [], MAX_NEW)[0]
    second = reference(lm, prompts[3], [], MAX_NEW)[0]
    return [s for s in (first[4:9], second[10:14]) if s.strip()]


@pytest.mark.parametrize("model_type", ["llama", "gemma2", "gpt2"])
def test_batched_generation_equals_step_by_step(tokenizer, model_type):
    lm = make_tiny(model_type, tokenizer, seed=11)
    prompts = prompts_of(tokenizer, 6)
    stops = stops_from_outputs(lm, prompts)
    expected = [reference(lm, p, stops, MAX_NEW) for p in prompts]
    lengths = [n for _, n in expected]
    # The test must exercise rows that stop early, at different steps, beside long ones.
    assert min(lengths) < MAX_NEW and len(set(lengths)) >= 2, lengths
    if model_type == "gemma2":
        assert max(len(p) for p in prompts) > lm.model.config.sliding_window
    texts = generation.greedy_batch(lm.model, tokenizer, prompts, stops, MAX_NEW)
    assert texts == [text for text, _ in expected]


def test_token_budget_batching_changes_no_text(tokenizer):
    """One prompt per batch, a few per batch, or all at once: the same text per item."""
    lm = make_tiny("llama", tokenizer, seed=12)
    rows = data.select_items("gsm8k/test", 5).items
    requests = [generation.GenRequest(doc_id, gsm8k_prompt(row, []), row["answer"])
                for doc_id, row in rows]
    longest = max(len(tokenizer.encode(r.context)) for r in requests) + MAX_NEW
    outputs, batches_seen = [], []
    for budget in (1, 2 * longest, 100 * longest):
        batches = []
        texts = generation.generate(lm.model, tokenizer, requests, ("Question:",), MAX_NEW,
                                    budget, on_batch=batches.append)
        outputs.append(texts)
        batches_seen.append(batches)
        assert sum(batches) == len(requests)
    assert outputs[0] == outputs[1] == outputs[2]
    assert (len(batches_seen[0]), len(batches_seen[2])) == (5, 1) and 1 < len(batches_seen[1]) < 5
    assert set(outputs[0]) == {doc_id for doc_id, _ in rows}


def test_buffered_cache_writes_in_place(tokenizer):
    """Full-attention layers get the preallocated cache; a step adds one slot, no copy."""
    lm = make_tiny("llama", tokenizer, seed=13)
    cache = generation.new_cache(lm.model, capacity=20)
    assert all(hasattr(layer, "allocate") for layer in cache.layers)
    keys = torch.randn(2, 2, 5, 16)
    layer = cache.layers[0]
    layer.update(keys, keys)
    buffer = layer.key_buffer
    out, _ = layer.update(keys[:, :, :1], keys[:, :, :1])
    assert layer.key_buffer is buffer and out.shape[2] == 6 and layer.get_seq_length() == 6
    assert torch.equal(out[:, :, :5], keys) and torch.equal(out[:, :, 5:], keys[:, :, :1])
    layer.batch_select_indices(torch.tensor([1]))
    assert torch.equal(layer.keys[0, :, :5], keys[1])
