"""GSM8K end to end on a tiny model: batched greedy generation equals a step-by-step loop."""
from __future__ import annotations

import dataclasses
import random

import pytest
import torch

from sw_lib import data
from sw_lib.evaluate import TASKS, run_task
from sw_lib.evaluate.tasks import extract_flexible, extract_strict, gsm8k_prompt, normalize_answer

from conftest import make_tiny

STOPS = ("Question:", "</s>", "<|im_end|>")



@torch.no_grad()
def greedy_reference(lm, context: str, new_tokens: int) -> str:
    """One full forward per new token, argmax, stop at end-of-sequence; cut at stop strings."""
    keep = lm.model.config.max_position_embeddings - new_tokens
    ids = lm.tokenizer.encode(context)[-keep:]
    start = len(ids)
    eos = lm.model.generation_config.eos_token_id
    for _ in range(new_tokens):
        token = int(lm.model(torch.tensor([ids])).logits[0, -1].argmax())
        ids.append(token)
        if token == eos:
            break
    text = lm.tokenizer.decode(ids[start:], skip_special_tokens=True)
    for stop in STOPS:
        text = text.split(stop)[0]
    return text


@pytest.mark.parametrize("shots, batch_size", [(0, 2), (5, 1)])
def test_gsm8k_generation_equals_greedy_loop(tokenizer, shots, batch_size, tmp_path):
    lm = make_tiny("llama", tokenizer, seed=9)
    spec = dataclasses.replace(TASKS["gsm8k"], max_gen_toks=6)
    result = run_task(lm, spec, 2, shots=shots, batch_size=batch_size, cache=tmp_path,
                      progress=False)
    assert result["task"] == "gsm8k" and result["primary_metric"] == "strict-match"
    assert set(result["metrics"]) == {"strict-match", "flexible-extract"}
    train = data.load_split("gsm8k/train")
    draw = random.Random(1234)  # lm-eval's sampler: seeded once, one draw per item in turn
    for (doc_id, row), item in zip(data.select_items("gsm8k/test", 2).items, result["per_item"]):
        shot_rows = draw.sample(train, shots) if shots else []
        expected = greedy_reference(lm, gsm8k_prompt(row, shot_rows), 6)
        assert item["doc_id"] == doc_id and item["generation"] == expected
        assert item["pred"] == {"strict-match": extract_strict(expected),
                                "flexible-extract": extract_flexible(expected)}
        assert item["gold"] == normalize_answer(row["answer"])  # e.g. "18"
        for metric, pred in item["pred"].items():
            assert item["correct"][metric] == int(normalize_answer(pred) == item["gold"])
    assert result["per_item"][0]["gold"] == "18"
    # max_gen_toks is part of the cache key: a longer budget is a new condition.
    longer = run_task(lm, dataclasses.replace(spec, max_gen_toks=7), 2, shots=shots,
                      batch_size=batch_size, cache=tmp_path, progress=False)
    assert longer["info"]["computed_items"] == 2
