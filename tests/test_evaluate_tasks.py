"""Task specs: prompt formats (exact strings), HellaSwag preprocessing, GSM8K answer extraction."""
from __future__ import annotations

import math

import numpy as np
import pytest

from sw_lib import data
from sw_lib.evaluate import TASKS, UnknownTaskError, get_task, mean_stderr, run_task
from sw_lib.evaluate.tasks import (
    INVALID,
    extract_flexible,
    extract_strict,
    gsm8k_prompt,
    hellaswag_preprocess,
    mmlu_prompt,
    normalize_answer,
)

MMLU_ROW = {"question": "  Which organelle makes ATP?\n", "subject": "high_school_biology",
            "choices": ["Nucleus", "Mitochondrion", "Ribosome", "Golgi body"], "answer": 1}
MMLU_DEV = [
    {"question": "What carries oxygen in blood?", "subject": "high_school_biology",
     "choices": ["Plasma", "Platelets", "Hemoglobin", "Lymph"], "answer": 2},
    {"question": "DNA is made of?", "subject": "high_school_biology",
     "choices": ["Nucleotides", "Amino acids", "Lipids", "Sugars only"], "answer": 0},
]


def test_mmlu_zero_and_k_shot_prompt_strings():
    assert mmlu_prompt(MMLU_ROW, []) == (
        "The following are multiple choice questions (with answers) about high school biology.\n\n"
        "Which organelle makes ATP?\nA. Nucleus\nB. Mitochondrion\nC. Ribosome\nD. Golgi body\n"
        "Answer:")
    assert mmlu_prompt(MMLU_ROW, MMLU_DEV) == (
        "The following are multiple choice questions (with answers) about high school biology.\n\n"
        "What carries oxygen in blood?\nA. Plasma\nB. Platelets\nC. Hemoglobin\nD. Lymph\n"
        "Answer: C\n\n"
        "DNA is made of?\nA. Nucleotides\nB. Amino acids\nC. Lipids\nD. Sugars only\n"
        "Answer: A\n\n"
        "Which organelle makes ATP?\nA. Nucleus\nB. Mitochondrion\nC. Ribosome\nD. Golgi body\n"
        "Answer:")
    request = TASKS["mmlu"].build(MMLU_ROW, 7, MMLU_DEV)
    assert request.choices == ("A", "B", "C", "D") and request.gold == 1 and request.doc_id == 7


def test_mmlu_k_shot_uses_the_first_dev_rows_of_the_same_subject():
    from sw_lib.evaluate.engine import build_requests

    sel = data.select_items("mmlu/test", 3)  # abstract_algebra, anatomy, astronomy
    dev = data.load_split("mmlu/dev")
    requests = build_requests(TASKS["mmlu"], sel.items, shots=2)
    for (_, row), request in zip(sel.items, requests):
        shots = [r for r in dev if r["subject"] == row["subject"]][:2]
        assert request.context == mmlu_prompt(row, shots)
        assert shots[0]["question"].strip() in request.context
    assert requests[1].context.startswith("The following are multiple choice questions (with "
                                          "answers) about anatomy.\n\n")


def test_hellaswag_preprocess():
    # One pass of "  " -> " ": the three spaces left by "[step]" become two (as lm-eval).
    assert hellaswag_preprocess("  A man [title] Is here.  [step] He  waves. ") == \
        "A man. Is here.  He waves."
    row = data.load_split("hellaswag/validation")[3243]  # a WikiHow row with brackets
    request = TASKS["hellaswag"].build(row, 3243, [])
    assert request.context == (
        "Personal Care and Style: How to become a fashion consultant. Obtain your high school "
        "diploma or ged. This job requires a high school diploma or equivalent, so make sure to "
        "apply yourself and finish school. If your high school offers these classes, take art, "
        "design, and sewing to familiarize yourself with foundational concepts in fashion.")
    # lm-eval strips before removing brackets, so a leading "[substeps] " leaves a space.
    assert request.choices[3] == (" Earn a bachelor's degree in a fashion-related field. Degrees "
                                  "for the fashion industry include art, fashion merchandising, "
                                  "and marketing.")
    assert request.gold == 3
    first = TASKS["hellaswag"].build(data.load_split("hellaswag/validation")[0], 0, [])
    assert first.context == "Roof shingle removal: A man is sitting on a roof. He"


def test_arc_prompt():
    row = data.load_split("ai2_arc/ARC-Easy/test")[0]
    request = TASKS["arc_easy"].build(row, 0, [])
    assert request.context == ("Question: Which statement best explains why photosynthesis is "
                               "the foundation of most food webs?\nAnswer:")
    assert request.choices[0] == "Sunlight is the source of energy for nearly all ecosystems."
    assert request.gold == 0


def test_gsm8k_prompt_joins_shots_with_blank_lines():
    shots = [{"question": "1+1?", "answer": "2\n#### 2"}, {"question": "2+2?", "answer": "#### 4"}]
    assert gsm8k_prompt({"question": "3+3?"}, shots) == (
        "Question: 1+1?\nAnswer: 2\n#### 2\n\nQuestion: 2+2?\nAnswer: #### 4\n\n"
        "Question: 3+3?\nAnswer:")
    assert gsm8k_prompt({"question": "3+3?"}, []) == "Question: 3+3?\nAnswer:"


@pytest.mark.parametrize("text, strict, flexible", [
    ("She pays 5 * 2 = 10 dollars.\n#### 10", "10", "10"),
    ("#### 1,234", "1,234", "1,234"),
    ("It costs $18.\n#### $18", INVALID, "$18"),            # strict wants digits after "#### "
    ("The answer is -3.5 degrees #### -3.5", "-3.5", "-3.5"),
    ("So the total is 42.", INVALID, "42."),
    ("#### 7. The end", "7.", "7."),
    ("no numbers here", INVALID, INVALID),
    ("the answer is 5 and then 7", INVALID, "7"),
])
def test_gsm8k_extraction(text, strict, flexible):
    assert extract_strict(text) == strict
    assert extract_flexible(text) == flexible


@pytest.mark.parametrize("pred, gold, same", [
    ("1,234", "Work...\n#### 1234", True),
    ("$18", "#### 18", True),
    ("42.", "#### 42", True),
    ("-3", "#### -3", True),
    ("3", "#### -3", False),
    (INVALID, "#### 5", False),
    ("5.0", "#### 5", False),  # exact match, not numeric equality (as lm-eval)
])
def test_gsm8k_answer_comparison(pred, gold, same):
    assert (normalize_answer(pred) == normalize_answer(gold)) is same


def test_unknown_task_lists_the_known_ones():
    with pytest.raises(UnknownTaskError) as err:
        get_task("piqa")
    message = str(err.value)
    assert message.startswith("Unknown task 'piqa'; known tasks:")
    for name in ("hellaswag", "arc_easy", "arc_challenge", "mmlu", "gsm8k"):
        assert name in message
    with pytest.raises(UnknownTaskError):
        run_task(None, "winogrande", 1)


def test_primary_metrics_and_shots():
    assert {n: t.primary_metric for n, t in TASKS.items()} == {
        "hellaswag": "acc_norm", "arc_easy": "acc_norm", "arc_challenge": "acc_norm",
        "mmlu": "acc", "gsm8k": "strict-match"}
    assert TASKS["mmlu"].default_shots == 0 and TASKS["gsm8k"].default_shots == 5
    with pytest.raises(ValueError, match="only 0-shot"):
        run_task(None, "hellaswag", 1, shots=3)
    # A changed prompt must change the cache key.
    assert TASKS["mmlu"].key(0) != TASKS["mmlu"].key(5)


def test_stderr_is_sample_std_over_sqrt_n():
    values = [1, 0, 0, 1, 1, 1, 0, 1]
    assert mean_stderr(values) == pytest.approx(np.std(values, ddof=1) / math.sqrt(len(values)))
    assert mean_stderr([1]) is None


# Train-row indices of the 5-shot exemplars lm-eval 0.4.13 put in the prompts of GSM8K test
# items 0, 1 and 2 (read from its logged prompts by benchmarks/compare_lm_eval.py, which found
# all prompts identical to the engine's).
LM_EVAL_GSM8K_SHOTS = {0: [6374, 3610, 957, 61, 742], 1: [7462, 6610, 4769, 286, 5501],
                       2: [5677, 687, 806, 6279, 2905]}


def test_gsm8k_exemplars_follow_lm_eval_sampler():
    """Seeded once (1234), one draw of 5 train rows per test item in turn: item i's exemplars
    depend on i, not on which other items are evaluated."""
    import random

    from sw_lib.evaluate.engine import build_requests

    train = data.load_split("gsm8k/train")
    items = data.select_items("gsm8k/test", 6).items
    requests = build_requests(TASKS["gsm8k"], items, shots=5)
    # lm-eval's ContextSampler, written out: Random(seed), then rnd.sample(docs, 5) per document.
    rnd = random.Random(1234)
    for (doc_id, row), request in zip(items, requests):
        shots = rnd.sample(train, 5)
        expected = "".join(f"Question: {s['question']}\nAnswer: {s['answer']}\n\n" for s in shots)
        assert request.context == expected + f"Question: {row['question']}\nAnswer:"
        if doc_id in LM_EVAL_GSM8K_SHOTS:
            assert shots == [train[i] for i in LM_EVAL_GSM8K_SHOTS[doc_id]]
    # Addressable per item: item 4 alone gets the exemplars it gets among items 0..5.
    alone = build_requests(TASKS["gsm8k"], [items[4]], shots=5)
    assert alone[0].context == requests[4].context
    assert requests[0].context != requests[1].context.replace(items[1][1]["question"],
                                                              items[0][1]["question"])
    # The protocol changed from "the first train rows": a new cache key.
    assert TASKS["gsm8k"].version == 2 and TASKS["gsm8k"].key(5)["fewshot_sampler"] == "default"
