"""Detection's reference text is the tail of the perplexity token stream, and no evaluated
window ever reads one of its tokens."""
from __future__ import annotations

import pytest
import torch

from sw_lib import config, reference
from sw_lib.evaluate import perplexity
from sw_lib.evaluate.perplexity import RESERVED_TAIL_TOKENS, select_windows, tokens_of

from conftest import make_tiny


def test_reference_is_the_tail_of_the_perplexity_token_stream(tokenizer):
    stream = tokens_of(tokenizer, None, "bundled")
    ref = reference.reference_text(tokenizer, 512)
    assert ref.ids.shape == (1, 512) and ref.ids[0].tolist() == stream[-512:]
    info = ref.info()
    assert info["token_span"] == [len(stream) - 512, len(stream)] and info["n_tokens"] == 512
    assert info["total_tokens"] == len(stream)
    assert "wikitext-2-raw-v1/test" in info["source"] and "perplexity window" in info["disjoint"]


@pytest.mark.parametrize("seq_len", [100, 512, 1000, 2048, 4096])
@pytest.mark.parametrize("n_windows", [1, 2, 7, None])
def test_reference_and_evaluated_windows_are_disjoint(tokenizer, seq_len, n_windows):
    total_tokens = len(tokens_of(tokenizer, None, "bundled"))
    chosen, excluded = select_windows(total_tokens, seq_len, n_windows, RESERVED_TAIL_TOKENS)
    evaluated = {t for w in chosen for t in range(w * seq_len, (w + 1) * seq_len)}
    for n_tokens in (2, 512, RESERVED_TAIL_TOKENS):
        start, end = reference.reference_span(total_tokens, n_tokens)
        assert end == total_tokens and not evaluated & set(range(start, end))
    # Only windows that overlap the reserved tail are left out, and every other one is
    # evaluated when all are asked for.
    full = total_tokens // seq_len
    usable = [w for w in range(full) if (w + 1) * seq_len <= total_tokens - RESERVED_TAIL_TOKENS]
    assert excluded == [w for w in range(full) if w not in usable]
    if n_windows is None:
        assert chosen == usable
    else:
        assert len(chosen) == n_windows and chosen == sorted(set(chosen))
        assert chosen[0] == 0 and set(chosen) <= set(usable)


def test_perplexity_records_the_windows_it_leaves_out(tokenizer):
    lm = make_tiny("llama", tokenizer, seed=6)
    total_tokens = len(tokens_of(tokenizer, None, "bundled"))
    # seq_len 512 (the tiny model's context): the last full windows reach into the tail.
    result = perplexity(lm, seq_len=512, n_windows=3, cache=False, progress=False)
    info = result["dataset_info"]
    usable = (total_tokens - RESERVED_TAIL_TOKENS) // 512
    assert info["excluded_windows"] == list(range(usable, total_tokens // 512))
    assert info["excluded_windows"] and info["reserved_tail_tokens"] == RESERVED_TAIL_TOKENS
    assert result["windows"] == [0, usable // 3, 2 * usable // 3]
    # A custom text holds no reference: nothing is left out.
    custom = perplexity(lm, seq_len=8, cache=False, progress=False, text="word " * 40)
    assert custom["dataset_info"]["excluded_windows"] == []
    assert custom["dataset_info"]["reserved_tail_tokens"] == 0


def test_reference_length_is_bounded_by_the_reserved_tail():
    with pytest.raises(ValueError, match="between 2 and 1024"):
        reference.reference_span(300000, RESERVED_TAIL_TOKENS + 1)
    with pytest.raises(ValueError, match="between 2 and 1024"):
        reference.reference_span(300000, 1)
    with pytest.raises(ValueError, match="overlaps the last 1024 tokens"):
        select_windows(2000, 1024, None, RESERVED_TAIL_TOKENS)
    # The params file allows exactly what the reserved tail holds.
    assert config.load(overrides={"detection.reference_tokens": RESERVED_TAIL_TOKENS})
    with pytest.raises(config.ConfigError, match="detection.reference_tokens"):
        config.load(overrides={"detection.reference_tokens": RESERVED_TAIL_TOKENS + 1})


def test_token_nll_is_float32_for_a_bfloat16_model(tokenizer):
    lm = make_tiny("llama", tokenizer)
    ids = reference.reference_text(tokenizer, 32).ids
    full = reference.token_nll(lm.model, ids)
    lm.model.to(torch.bfloat16)
    half = reference.token_nll(lm.model, ids)
    assert full.dtype == half.dtype == torch.float32 and half.shape == (31,)
    assert torch.allclose(full, half, atol=0.1)
