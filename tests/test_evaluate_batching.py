"""Batches by length under a token budget; shared prefixes; logits only where scored.

None of these may change a per-item result: each is compared with the computation without it.
"""
from __future__ import annotations

import pytest
import torch

from sw_lib import data
from sw_lib.evaluate import TASKS, forward, multiple_choice
from sw_lib.evaluate.batching import by_budget
from sw_lib.evaluate.engine import build_requests
from sw_lib.evaluate.prefix import decoder

from conftest import make_tiny


def test_by_budget_sorts_longest_first_and_respects_the_budget():
    lengths = {"a": 5, "b": 9, "c": 2, "d": 9, "e": 4, "f": 30}
    batches = by_budget(list(lengths), lengths.get, token_budget=20)
    assert [x for b in batches for x in b] == ["f", "b", "d", "a", "e", "c"]  # stable on ties
    assert batches == [["f"], ["b", "d"], ["a", "e", "c"]]  # "f" alone exceeds the budget
    for batch in batches[1:]:
        assert len(batch) * max(lengths[x] for x in batch) <= 20
    assert by_budget(list(lengths), lengths.get, 1000, max_rows=4) == [["f", "b", "d", "a"],
                                                                        ["e", "c"]]
    with pytest.raises(ValueError, match="token_budget"):
        by_budget(["a"], lengths.get, 0)


def encoded_requests(lm, task: str, items, shots: int = 0):
    requests = build_requests(TASKS[task], items, shots)
    return requests, [multiple_choice.encode_request(lm.tokenizer, r) for r in requests]


@torch.no_grad()
def brute_force_sums(lm, encoded) -> dict[int, list[float]]:
    """One full forward per (question, choice), logits at every position."""
    out = {}
    for enc in encoded:
        sums = []
        for cont in enc.continuations:
            ids = torch.tensor([enc.context + cont])
            logp = torch.log_softmax(lm.model(ids[:, :-1]).logits[0].float(), dim=-1)
            start = len(enc.context) - 1
            sums.append(sum(logp[start + i, t].item() for i, t in enumerate(cont)))
        out[enc.doc_id] = sums
    return out


def assert_same(a: dict, b: dict, tol: float = 2e-4):
    assert a.keys() == b.keys()
    for doc_id in a:
        assert a[doc_id] == pytest.approx(b[doc_id], abs=tol), doc_id


def test_budget_changes_no_log_likelihood(tokenizer):
    lm = make_tiny("llama", tokenizer, seed=15)
    _, encoded = encoded_requests(lm, "hellaswag", data.select_items("hellaswag/validation", 7).items)
    reference = brute_force_sums(lm, encoded)
    seen = []
    for budget in (1, 300, 10 ** 6):
        sizes = []
        sums = multiple_choice.choice_loglikelihoods(lm.model, encoded, budget, sizes.append)
        assert_same(sums, reference)
        seen.append(sizes)
    assert seen[0] == [1] * 7 and seen[2] == [7] and 1 < len(seen[1]) < 7


def count_decoder_reads(lm, run):
    """Tokens (rows x length) of every decoder pass while `run()` computes."""
    read = []
    handle = decoder(lm.model).embed_tokens.register_forward_hook(
        lambda m, args, out: read.append(args[0].shape[0] * args[0].shape[1]))
    try:
        return run(), read
    finally:
        handle.remove()


def test_shared_prefix_is_encoded_once_and_changes_nothing(tokenizer):
    """k-shot MMLU questions of one subject share the description and the solved examples."""
    lm = make_tiny("llama", tokenizer, seed=16)
    rows = data.load_split("mmlu/test")
    anatomy = [(i, r) for i, r in enumerate(rows) if r["subject"] == "anatomy"][:4]
    astronomy = [(i, r) for i, r in enumerate(rows) if r["subject"] == "astronomy"][:3]
    requests, encoded = encoded_requests(lm, "mmlu", anatomy + astronomy, shots=2)
    assert max(e.packed_length for e in encoded) <= forward.max_length(lm.model)  # all packed
    groups = multiple_choice.shared_prefix_groups(encoded)
    # The two subjects share the description's first words too, but far fewer tokens than
    # their own examples: they stay two groups.
    shared = sorted((n, sorted(e.doc_id for e in members)) for n, members in groups)
    assert [ids for _, ids in shared] == sorted([sorted(i for i, _ in astronomy),
                                                 sorted(i for i, _ in anatomy)])
    for n, members in groups:  # the prefix is the same tokens for every member, and long
        assert n >= 100
        assert all(e.context[:n] == members[0].context[:n] for e in members)
        assert all(n < len(e.context) for e in members)

    # Count the tokens the decoder reads: the shared prefixes once per subject (one batch,
    # padded to the longer), then all questions in one batch, each row after its prefix.
    assert forward.shared_prefix_ok(lm.model)  # (its probe runs before the count starts)
    sums, read = count_decoder_reads(
        lm, lambda: multiple_choice.choice_loglikelihoods(lm.model, encoded, 10 ** 6))
    assert_same(sums, brute_force_sums(lm, encoded))
    after = {e.doc_id: e.packed_length - n for n, members in groups for e in members}
    assert read == [len(groups) * max(n for n, _ in groups), len(encoded) * max(after.values())]
    assert sum(read) < sum(e.packed_length for e in encoded)


def test_questions_of_different_prefixes_share_batches(tokenizer):
    """0-shot MMLU questions of different subjects share the description's opening words:
    encoded once, then batched with HellaSwag questions that share nothing (rows after
    prefixes of different lengths, and after none, in one batch), at any budget."""
    lm = make_tiny("llama", tokenizer, seed=21)
    _, mmlu = encoded_requests(lm, "mmlu", data.select_items("mmlu/test", 6).items)
    _, hellaswag = encoded_requests(lm, "hellaswag",
                                    data.select_items("hellaswag/validation", 3).items)
    for i, enc in enumerate(hellaswag):
        enc.doc_id = 1000 + i  # one call scores both tasks: doc ids must not collide
    groups = multiple_choice.shared_prefix_groups(mmlu + hellaswag)
    (n, members), = [(n, m) for n, m in groups if n]
    opening = tokenizer.encode("The following are multiple choice questions (with answers) about")
    assert members == sorted(mmlu, key=lambda e: e.context) and n >= len(opening) >= 8
    assert all(e.context[:n] == mmlu[0].context[:n] for e in mmlu)
    assert len({e.context[n] for e in mmlu}) > 1  # the longest prefix they all share

    reference = brute_force_sums(lm, mmlu + hellaswag)
    assert forward.shared_prefix_ok(lm.model)
    for budget in (1, 200, 10 ** 6):
        sums, read = count_decoder_reads(lm, lambda: multiple_choice.choice_loglikelihoods(
            lm.model, mmlu + hellaswag, budget))
        assert_same(sums, reference)
    # The largest budget: the prefix once, then one batch of all nine rows.
    rows = [e.packed_length - n for e in mmlu] + [e.packed_length for e in hellaswag]
    assert read == [n, 9 * max(rows)]


@pytest.mark.parametrize("model_type", ["llama", "gemma2"])
@torch.no_grad()
def test_position_restricted_logits_equal_the_full_ones(tokenizer, model_type):
    """The head applied at chosen positions gives the full forward's log-probabilities there
    (gemma2: with its final logit soft-capping)."""
    lm = make_tiny(model_type, tokenizer, seed=17)
    ids = torch.tensor([tokenizer.encode("The quick brown fox jumps over the lazy dog again.")])
    full = torch.log_softmax(lm.model(ids).logits[0].float(), dim=-1)
    hidden = decoder(lm.model)(input_ids=ids).last_hidden_state[0]
    positions = torch.tensor([0, 3, ids.shape[1] - 1])
    targets = torch.tensor([5, 17, 4000])
    chosen = forward.token_logprobs(lm.model, hidden[positions], targets)
    assert torch.allclose(chosen, full[positions, targets], atol=1e-5, rtol=0)


@pytest.mark.parametrize("case", ["float32", "bfloat16", "gemma2-softcap", "head-bias"])
@torch.no_grad()
def test_head_buffers_give_log_softmax_bit_for_bit(tokenizer, monkeypatch, case):
    """On a CPU the head writes into buffers kept on the model (no fresh 200 MB map per chunk);
    every value equals the log-softmax of the model's own head (soft-capped) exactly, over several chunks, a
    short last chunk, and a second call of another size reusing the buffers."""
    lm = make_tiny("gemma2" if case == "gemma2-softcap" else "llama", tokenizer, seed=18)
    model = lm.model
    if case == "bfloat16":
        model.to(torch.bfloat16)
    if case == "head-bias":
        head = model.get_output_embeddings()
        head.bias = torch.nn.Parameter(torch.randn(head.weight.shape[0]))
    if case == "gemma2-softcap":
        assert model.config.final_logit_softcapping
    monkeypatch.setattr(forward, "HEAD_CHUNK", 4)
    g = torch.Generator().manual_seed(0)
    dtype = next(model.parameters()).dtype
    for n in (10, 3):
        hidden = torch.randn(n, model.config.hidden_size, generator=g).to(dtype)
        targets = torch.randint(0, model.config.vocab_size, (n,), generator=g)
        logits = model.get_output_embeddings()(hidden)  # as the model's own forward does
        cap = model.config.final_logit_softcapping if case == "gemma2-softcap" else None
        if cap:
            logits = torch.tanh(logits / cap) * cap
        reference = torch.log_softmax(logits.float(), dim=-1)
        got = forward.token_logprobs(model, hidden, targets)
        assert torch.equal(got, reference[torch.arange(n), targets])
    assert all(b.shape[0] == 4 for b in model._sw_head_buffers.values())  # made once, reused


def test_single_token_choices_run_causal_rows_without_a_mask(tokenizer, monkeypatch):
    """0-shot MMLU without its shared prefix: every choice is one token, so a packed row is
    its context alone; the rows run through the model's causal attention (no 4-D mask built)
    and equal the brute force."""
    lm = make_tiny("llama", tokenizer, seed=19)
    _, encoded = encoded_requests(lm, "mmlu", data.select_items("mmlu/test", 7).items)
    assert all(len(c) == 1 for e in encoded for c in e.continuations)
    assert len({e.packed_length for e in encoded}) > 1  # padded rows of different lengths
    monkeypatch.setattr(multiple_choice, "MIN_SHARED", 10 ** 6)  # no prefix worth sharing
    assert forward.fast_path_ok(lm.model)  # (its probe has branches, so it builds masks)
    built = []
    monkeypatch.setattr(forward, "packed_mask", lambda *a, **k: built.append(1))
    for budget in (1, 10 ** 6):
        sums = multiple_choice.choice_loglikelihoods(lm.model, encoded, budget)
        assert_same(sums, brute_force_sums(lm, encoded))
    assert not built
