"""Multiple-choice scores equal a brute-force loop: one full forward per (context, choice)."""
from __future__ import annotations

import pytest
import torch

from sw_lib import data
from sw_lib.evaluate import TASKS, run_task
from sw_lib.evaluate.engine import build_requests
from sw_lib.evaluate.multiple_choice import encode_pair

from conftest import make_tiny


def reference_encode(tokenizer, context: str, continuation: str):
    """lm-eval's _encode_pair, written out again for the reference."""
    stripped = context.rstrip()
    continuation = context[len(stripped):] + continuation
    whole = tokenizer.encode(stripped + continuation)
    ctx = tokenizer.encode(stripped)
    return ctx, whole[len(ctx):]


@torch.no_grad()
def brute_force(lm, task: str, n: int, shots: int = 0) -> list[dict]:
    """Per item: summed log-likelihood of each choice from its own full forward pass."""
    spec = TASKS[task]
    requests = build_requests(spec, data.select_items(spec.split, n).items, shots)
    out = []
    for request in requests:
        lls = []
        for choice in request.choices:
            ctx, cont = reference_encode(lm.tokenizer, request.context, " " + choice)
            ids = torch.tensor([ctx + cont])
            logp = torch.log_softmax(lm.model(ids[:, :-1]).logits[0].float(), dim=-1)
            lls.append(sum(logp[len(ctx) - 1 + i, t].item() for i, t in enumerate(cont)))
        norm = [ll / len(c) for ll, c in zip(lls, request.choices)]
        out.append({"doc_id": request.doc_id, "gold": request.gold, "lls": lls,
                    "acc": max(range(len(lls)), key=lambda i: lls[i]),
                    "acc_norm": max(range(len(norm)), key=lambda i: norm[i])})
    return out


def assert_matches(result: dict, reference: list[dict], metrics=("acc", "acc_norm")):
    assert [item["doc_id"] for item in result["per_item"]] == [r["doc_id"] for r in reference]
    for item, ref in zip(result["per_item"], reference):
        assert item["loglikelihoods"] == pytest.approx(ref["lls"], abs=2e-4, rel=1e-5)
        for metric in metrics:
            assert item["pred"][metric] == ref[metric], (item["doc_id"], metric)
            assert item["correct"][metric] == int(ref[metric] == ref["gold"])
    for metric in metrics:
        share = sum(r[metric] == r["gold"] for r in reference) / len(reference)
        assert result["metrics"][metric]["value"] == pytest.approx(share)


def test_encode_pair_moves_trailing_spaces_to_the_continuation(tokenizer):
    ctx, cont = encode_pair(tokenizer, "Answer: ", "Paris")
    assert ctx == tokenizer.encode("Answer:")
    assert ctx + cont == tokenizer.encode("Answer: Paris")
    assert tokenizer.decode(cont) == " Paris"
    ctx, cont = encode_pair(tokenizer, "Question: 2+2?\nAnswer:", " 4")
    assert tokenizer.decode(ctx) == "Question: 2+2?\nAnswer:" and tokenizer.decode(cont) == " 4"


@pytest.mark.parametrize("model_type", ["llama", "gpt2", "qwen3", "gemma2"])
def test_arc_and_hellaswag_equal_brute_force(tokenizer, model_type):
    lm = make_tiny(model_type, tokenizer, seed=1)
    for task, n in (("arc_easy", 6), ("hellaswag", 4)):
        # batch_size 3: rows of different lengths share a padded batch.
        result = run_task(lm, task, n, cache=False, batch_size=3, progress=False)
        assert result["n_samples"] == n and result["capped"] is False
        assert_matches(result, brute_force(lm, task, n))


def test_mmlu_k_shot_equals_brute_force(tokenizer):
    lm = make_tiny("llama", tokenizer, seed=2)
    result = run_task(lm, "mmlu", 4, shots=1, cache=False, batch_size=2, progress=False)
    assert list(result["metrics"]) == ["acc"] and result["info"]["shots"] == 1
    assert_matches(result, brute_force(lm, "mmlu", 4, shots=1), metrics=("acc",))


def test_plain_fallback_equals_packed(tokenizer):
    lm = make_tiny("llama", tokenizer, seed=3)
    packed = run_task(lm, "arc_easy", 5, cache=False, batch_size=4, progress=False)
    lm.model._sw_eval_fast_path = False  # as for a family that fails the packed-path check
    plain = run_task(lm, "arc_easy", 5, cache=False, batch_size=4, progress=False)
    for a, b in zip(packed["per_item"], plain["per_item"]):
        assert a["loglikelihoods"] == pytest.approx(b["loglikelihoods"], abs=2e-4)
        assert a["pred"] == b["pred"]


def test_capping_reports_counts(tokenizer):
    import dataclasses

    # A smaller still model: this test scores all 285 MMLU dev questions.
    lm = make_tiny("llama", tokenizer, seed=4, hidden_size=16, intermediate_size=32,
                   num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1, head_dim=8)

    spec = dataclasses.replace(TASKS["mmlu"], name="mmlu_dev", split="mmlu/dev")
    result = run_task(lm, spec, 300, cache=False, batch_size=16, progress=False)
    assert result["capped"] is True and result["n_requested"] == 300
    assert result["n_samples"] == result["info"]["n_available"] == 285
    assert result["metrics"]["acc"]["stderr"] is not None
