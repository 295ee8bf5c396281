"""Perplexity equals a per-token brute force; windows follow the gptq convention."""
from __future__ import annotations

import math

import pytest
import torch

from sw_lib import data
from sw_lib.evaluate import perplexity
from sw_lib.evaluate.perplexity import RESERVED_TAIL_TOKENS, window_indices

from conftest import make_tiny

TEXT = ("Robert Boulter is an English film, television and theatre actor. He had a guest starring "
        "role on the television series The Bill in 2000. This was followed by a starring role in "
        "the play Herons written by Simon Stephens, which was performed in 2001 at the Royal Court "
        "Theatre. He had a guest role in the television series Judge John Deed in 2002.")



@torch.no_grad()
def brute_force_window_nll(model, window: list[int]) -> float:
    """-sum log p(token t | tokens before t), one forward pass per predicted token."""
    total = 0.0
    for t in range(1, len(window)):
        logits = model(torch.tensor([window[:t]])).logits[0, -1].double()
        total -= torch.log_softmax(logits, dim=-1)[window[t]].item()
    return total


def test_perplexity_equals_per_token_brute_force(tokenizer):
    lm = make_tiny("llama", tokenizer, seed=5)
    tokens = tokenizer(TEXT).input_ids
    seq_len = 12
    total = len(tokens) // seq_len
    result = perplexity(lm, seq_len=seq_len, n_windows=3, batch_size=2, cache=False,
                        progress=False, text=TEXT)
    assert result["windows"] == [0, total // 3, 2 * total // 3]
    expected = [brute_force_window_nll(lm.model, tokens[w * seq_len:(w + 1) * seq_len])
                for w in result["windows"]]
    assert result["per_window_nll"] == pytest.approx(expected, rel=1e-5)
    assert result["n_tokens"] == 3 * (seq_len - 1) and result["n_windows"] == 3
    assert result["nll_sum"] == pytest.approx(sum(expected), rel=1e-5)
    assert result["perplexity"] == pytest.approx(math.exp(sum(expected) / (3 * 11)), rel=1e-5)
    info = result["dataset_info"]
    assert info["total_windows"] == total and info["windows_used"] == 3


def test_all_windows_and_remainder_dropped(tokenizer):
    lm = make_tiny("llama", tokenizer, seed=5)
    tokens = tokenizer(TEXT).input_ids
    result = perplexity(lm, seq_len=10, cache=False, progress=False, text=TEXT)
    assert result["windows"] == list(range(len(tokens) // 10))  # n_windows=None: every window
    # The plain forward's mean loss per window gives the same number.
    losses = []
    with torch.no_grad():
        for w in result["windows"]:
            ids = torch.tensor([tokens[w * 10:(w + 1) * 10]])
            losses.append(lm.model(ids, labels=ids).loss.item())
    assert result["perplexity"] == pytest.approx(math.exp(sum(losses) / len(losses)), rel=1e-5)
    with pytest.raises(ValueError, match="fewer than one window"):
        perplexity(lm, seq_len=500, cache=False, progress=False, text="too short")


def test_window_indices_evenly_spaced():
    assert window_indices(10, 3) == [0, 3, 6]
    assert window_indices(148, 4) == [0, 37, 74, 111]
    assert window_indices(5, None) == window_indices(5, 9) == [0, 1, 2, 3, 4]
    with pytest.raises(ValueError):
        window_indices(5, 0)


def test_wikitext_is_joined_rows_cut_into_windows(tokenizer):
    lm = make_tiny("llama", tokenizer, seed=6)
    tokens = tokenizer("\n\n".join(data.wikitext_rows())).input_ids
    # seq_len above the tiny model's 512 positions is capped to 512.
    result = perplexity(lm, seq_len=2048, n_windows=2, batch_size=2, cache=False, progress=False)
    assert result["seq_len"] == 512
    info = result["dataset_info"]
    assert info["name"] == "wikitext-2-raw-v1/test"
    assert info["total_tokens"] == len(tokens) and info["total_windows"] == len(tokens) // 512
    # Windows reaching into detection's reference text (the stream's tail) are never evaluated.
    usable = (len(tokens) - RESERVED_TAIL_TOKENS) // 512
    assert result["windows"] == [0, usable // 2]
    with torch.no_grad():
        for w, nll in zip(result["windows"], result["per_window_nll"]):
            ids = torch.tensor([tokens[w * 512:(w + 1) * 512]])
            assert nll == pytest.approx(lm.model(ids, labels=ids).loss.item() * 511, rel=1e-5)
