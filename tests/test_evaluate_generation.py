"""Batched, cached greedy generation equals the unbatched, uncached step-by-step computation.

The reference runs one full forward pass per new token for one prompt at a time and applies
lm-eval's stopping rule on its own (an end-of-sequence token, or a stop string in the text
decoded with special tokens), then cuts the text at the stop strings. Stop strings are taken
from the models' own outputs so that rows stop at different steps: finished rows leave the
batch and waiting prompts join it while others go on.
"""
from __future__ import annotations

import pytest
import torch

from sw_lib import data
from sw_lib.evaluate import generation
from sw_lib.evaluate.tasks import GenRequest, gsm8k_prompt

from conftest import make_tiny

MAX_NEW = 12


@torch.no_grad()
def reference(lm, context: str, until: list[str], max_new: int) -> tuple[str, int]:
    """(text, tokens generated) for one prompt, no cache, no batch."""
    stops = list(until) + [lm.tokenizer.eos_token]
    ids, new = lm.tokenizer.encode(context), []
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


def requests_of(n: int) -> list[GenRequest]:
    """0-shot GSM8K prompts of different lengths (some longer than gemma2's 64-token window)."""
    return [GenRequest(doc_id, gsm8k_prompt(row, []), row["answer"])
            for doc_id, row in data.select_items("gsm8k/test", n).items]


def stops_from_outputs(lm, requests: list[GenRequest]) -> list[str]:
    """Stop strings that the model itself produces early in some of the prompts."""
    outputs = [reference(lm, r.context, [], MAX_NEW)[0] for r in requests[:4]]
    return [s for s in (outputs[0][4:9], outputs[3][10:14]) if s.strip()]


@pytest.mark.parametrize("model_type, rows", [("llama", 3), ("llama", None), ("gemma2", 3),
                                              ("gpt2", 2)])
def test_batched_generation_equals_step_by_step(tokenizer, model_type, rows):
    """rows=3 with 7 prompts: prompts wait and join as rows finish (gemma2: padded batches)."""
    lm = make_tiny(model_type, tokenizer, seed=11)
    requests = requests_of(7)
    until = stops_from_outputs(lm, requests)
    expected = {r.doc_id: reference(lm, r.context, until, MAX_NEW) for r in requests}
    lengths = [n for _, n in expected.values()]
    # The test must exercise rows that stop early, at different steps, beside long ones.
    assert min(lengths) < MAX_NEW and len(set(lengths)) >= 3 and max(lengths) == MAX_NEW, lengths
    if model_type == "gemma2":
        longest = max(len(tokenizer.encode(r.context)) for r in requests)
        assert longest > lm.model.config.sliding_window
    done = []
    texts = generation.generate(lm.model, tokenizer, requests, until, MAX_NEW, 10 ** 6, rows,
                                done.append)
    assert texts == {doc_id: text for doc_id, (text, _) in expected.items()}
    assert sum(done) == len(requests)


def test_token_budget_changes_no_text(tokenizer):
    """Padded batches (a sliding-window family): one prompt per batch, a few, or all at once."""
    lm = make_tiny("gemma2", tokenizer, seed=12)
    requests = requests_of(5)
    longest = max(len(tokenizer.encode(r.context)) for r in requests)
    outputs, batches_seen = [], []
    for budget in (1, 2 * longest, 100 * longest):
        batches = []
        outputs.append(generation.generate(lm.model, tokenizer, requests, ("Question:",), MAX_NEW,
                                           budget, on_done=batches.append))
        batches_seen.append(batches)
    assert outputs[0] == outputs[1] == outputs[2]
    assert (len(batches_seen[0]), len(batches_seen[2])) == (5, 1) and 1 < len(batches_seen[1]) < 5


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
