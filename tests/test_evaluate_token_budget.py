"""The token budget "auto" in an evaluation: batching by it changes no per-item result, and the
results record the number of tokens per forward pass it resolved to."""
from __future__ import annotations

import pytest

from sw_lib import memory, study
from sw_lib.evaluate import multiple_choice, perplexity, run_task

from conftest import make_tiny


@pytest.fixture
def free_for_600_tokens(monkeypatch):
    """The OS reports as free twice the activations of 600 tokens: "auto" gives 600 on a CPU
    (under its cap of 1024), whatever this machine really has free."""
    def free(lm):
        per_token = memory.activations_bytes(lm.model.config, 1, "float32")
        monkeypatch.setattr(memory, "available_bytes", lambda device: 1200 * per_token)
        return 600
    return free


@pytest.fixture
def batch_counts(monkeypatch):
    """How many batches each multiple-choice pass was cut into (the real by_budget, counted)."""
    counts: list[int] = []
    real = multiple_choice.by_budget

    def counted(*args, **kwargs):
        batches = real(*args, **kwargs)
        counts.append(len(batches))
        return batches
    monkeypatch.setattr(multiple_choice, "by_budget", counted)
    return counts


def test_auto_and_a_small_budget_give_identical_per_item_results(tokenizer, free_for_600_tokens,
                                                                 batch_counts):
    lm = make_tiny("llama", tokenizer, seed=3)
    assert free_for_600_tokens(lm) == 600
    auto = run_task(lm, "arc_easy", 6, cache=False, batch_size=None, progress=False,
                    token_budget="auto")
    auto_batches = sum(batch_counts)
    batch_counts.clear()
    one_by_one = run_task(lm, "arc_easy", 6, cache=False, batch_size=None, progress=False,
                          token_budget=1)
    assert lm.auto_token_budget == 600
    assert sum(batch_counts) > auto_batches  # the two runs really batched differently
    # Every decision is identical; a log-likelihood may differ in float32's last bits, as the
    # padded shape of a pass changes the matmuls' summation order (as across any two batchings).
    for a, b in zip(auto["per_item"], one_by_one["per_item"], strict=True):
        assert {k: v for k, v in a.items() if k != "loglikelihoods"} == {
            k: v for k, v in b.items() if k != "loglikelihoods"}
        assert a["loglikelihoods"] == pytest.approx(b["loglikelihoods"], rel=1e-6)
    assert auto["metrics"] == one_by_one["metrics"]

    windows = dict(seq_len=32, n_windows=4, batch_size=None, cache=False, progress=False)
    assert (perplexity(lm, token_budget="auto", **windows)["per_window_nll"]  # 4 windows a pass
            == pytest.approx(perplexity(lm, token_budget=32, **windows)["per_window_nll"],
                             rel=1e-6))  # 1 window a pass


def test_the_results_record_the_budget_a_study_used(tokenizer, free_for_600_tokens):
    lm = make_tiny("llama", tokenizer, seed=3)
    free_for_600_tokens(lm)
    small = dict(perplexity_samples=1, seq_len=16, skip_accuracy=True, progress=False)
    individual = study.individual_ablation(lm, [], study.StudySettings(**small), cache=False)
    assert individual["settings"]["token_budget"] == "auto"
    assert individual["settings"]["resolved_token_budget"] == 600
    explicit = study.StudySettings(**small, token_budget=48)
    assert study.individual_ablation(lm, [], explicit, cache=False)["settings"][
        "resolved_token_budget"] == 48
    # nothing loaded (no super weights to ablate): nothing resolved, the setting is kept
    nothing = study.combined_ablation(None, [], study.StudySettings(**small))["settings"]
    assert (nothing["token_budget"], nothing["resolved_token_budget"]) == ("auto", None)
