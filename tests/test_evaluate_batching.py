"""Batches by length under a token budget; shared prefixes; logits only where scored.

None of these may change a per-item result: each is compared with the computation without it.
"""
from __future__ import annotations

import pytest
import torch

from sw_lib import data
from sw_lib.evaluate import TASKS, forward, multiple_choice, sharing
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
    # Empty slots: "b" under "f" would leave 21, so "f" alone; then "d" leaves 0 under "b",
    # "a" 4, "e" 5 more (9 > 8, a new batch), "c" 2 under "e".
    assert by_budget(list(lengths), lengths.get, 1000, max_waste=8) == [
        ["f"], ["b", "d", "a"], ["e", "c"]]


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


def common_prefix(contexts: list[list[int]]) -> list[int]:
    """The tokens every context starts with, leaving each its last (brute force)."""
    n = 0
    while n < min(len(c) for c in contexts) - 1 and len({c[n] for c in contexts}) == 1:
        n += 1
    return contexts[0][:n]


def tree_of(encoded):
    return sharing.prefix_tree([e.context for e in encoded], multiple_choice.MIN_SAVED)


def test_prefix_tree_nests_shared_prefixes_worth_a_node():
    """Nodes are the prefixes their contexts share; one that saves fewer than `min_saved`
    token encodings hangs its contexts on its parent; a context's last token stays out."""
    contexts = [[1, 2, 3, 4, 5, 9], [1, 2, 3, 4, 6, 9], [1, 2, 3, 7, 9], [8, 8, 9],
                [1, 2, 3, 4, 5, 10], [5, 6], [5, 6, 7]]
    tree = sharing.prefix_tree(contexts, min_saved=2)
    # [1,2,3] saves 3 x 3; [1,2,3,4] saves 2 x 1 more; [1,2,3,4,5] would save 1 x 1: no node;
    # [5] saves 1 (the last token of [5, 6] stays outside it): no node.
    assert tree.tokens == [[1, 2, 3], [1, 2, 3, 4]]
    assert tree.parents == [-1, 0] and tree.sizes == [4, 3]
    assert tree.node_of == [1, 1, 0, -1, 1, -1, -1]
    assert tree.ancestors(1) == [0] and tree.with_ancestors([1]) == [0, 1]
    assert tree.chunks(7) == [[0, 1]] and tree.chunks(5) == [[0], [1]]
    # At 3, [1,2,3,4] is no node, and [1,2,3,4,5] measured from [1,2,3] saves 1 x 2: none.
    tree = sharing.prefix_tree(contexts, min_saved=3)
    assert tree.tokens == [[1, 2, 3]] and tree.node_of == [0, 0, 0, -1, 0, -1, -1]
    # Skipped nodes still let deeper sharing through: [7,7] saves 1 x 2 (< 3), but under it
    # [7,7,1,1,1] saves 2 x 5 from the root.
    tree = sharing.prefix_tree([[7, 7, 1, 1, 1, 2], [7, 7, 1, 1, 1, 3], [7, 7, 1, 1, 1, 4],
                                [7, 7, 2, 0]], min_saved=3)
    assert tree.tokens == [[7, 7], [7, 7, 1, 1, 1]] and tree.parents == [-1, 0]
    assert sharing.prefix_tree([], 8).tokens == []


def test_prefixes_encoded_after_their_parents_equal_a_fresh_encoding(tokenizer):
    """A prefix encoded after the cache of a prefix it extends has the keys and values that
    encoding it whole gives, batched with prefixes of other parents and lengths."""
    lm = make_tiny("llama", tokenizer, seed=23)
    g = torch.Generator().manual_seed(1)
    a = torch.randint(0, 1000, (12,), generator=g).tolist()
    b = torch.randint(0, 1000, (5,), generator=g).tolist()
    prefixes = [a[:3], a[:9], b[:2], a[:4], b, a[:9] + [1, 2]]
    parents = [-1, 0, -1, 0, 2, 1]
    nested = forward.encode_prefixes(lm.model, prefixes, 10 ** 6, parents)
    for budget in (1, 10 ** 6):
        whole = forward.encode_prefixes(lm.model, prefixes, budget)
        for g_, (mine, ref) in enumerate(zip(nested.layers, whole.layers)):
            for (k, v), (k0, v0) in zip(mine, ref):
                assert k.shape == k0.shape == (k0.shape[0], len(prefixes[g_]), k0.shape[2])
                assert torch.allclose(k, k0, atol=1e-5) and torch.allclose(v, v0, atol=1e-5)
    with pytest.raises(ValueError, match="parent"):
        forward.encode_prefixes(lm.model, prefixes[:2], 10, [1, -1])


def test_shared_prefix_is_encoded_once_and_changes_nothing(tokenizer):
    """k-shot MMLU questions of two subjects share the description's opening words, and the
    questions of one subject the rest of its description and its solved examples."""
    lm = make_tiny("llama", tokenizer, seed=16)
    rows = data.load_split("mmlu/test")
    anatomy = [(i, r) for i, r in enumerate(rows) if r["subject"] == "anatomy"][:4]
    astronomy = [(i, r) for i, r in enumerate(rows) if r["subject"] == "astronomy"][:3]
    requests, encoded = encoded_requests(lm, "mmlu", anatomy + astronomy, shots=2)
    assert max(e.packed_length for e in encoded) <= forward.max_length(lm.model)  # all packed
    tree = tree_of(encoded)
    assert tree.tokens[0] == common_prefix([e.context for e in encoded])
    assert tree.parents == [-1, 0, 0]
    for subject in (anatomy, astronomy):
        ids = {i for i, _ in subject}
        (node,) = {g for e, g in zip(encoded, tree.node_of) if e.doc_id in ids}
        assert tree.tokens[node] == common_prefix([e.context for e in encoded if e.doc_id in ids])
        assert len(tree.tokens[node]) >= 100  # the solved examples

    # Count the tokens the decoder reads: the opening once, each subject's prefix past it
    # (two passes: padding the shorter would cost more than a pass), then all questions in
    # one batch, each after its own prefix.
    assert forward.shared_prefix_ok(lm.model)  # (its probe runs before the count starts)
    sums, read = count_decoder_reads(
        lm, lambda: multiple_choice.choice_loglikelihoods(lm.model, encoded, 10 ** 6))
    assert_same(sums, brute_force_sums(lm, encoded))
    opening = len(tree.tokens[0])
    after = [e.packed_length - len(tree.tokens[g]) for e, g in zip(encoded, tree.node_of)]
    segments = sorted((len(t) - opening for t in tree.tokens[1:]), reverse=True)
    assert segments[0] - segments[1] > forward.PASS_TOKENS
    assert read == [opening, *segments, len(encoded) * max(after)]
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
    tree = tree_of(mmlu + hellaswag)
    opening = tokenizer.encode("The following are multiple choice questions (with answers) about")
    assert tree.tokens == [common_prefix([e.context for e in mmlu])]
    assert len(tree.tokens[0]) >= len(opening) and tree.node_of == [0] * 6 + [-1] * 3
    n = len(tree.tokens[0])

    reference = brute_force_sums(lm, mmlu + hellaswag)
    assert forward.shared_prefix_ok(lm.model)
    for budget in (1, 200, 10 ** 6):
        sums, read = count_decoder_reads(lm, lambda: multiple_choice.choice_loglikelihoods(
            lm.model, mmlu + hellaswag, budget))
        assert_same(sums, reference)
    # The largest budget: the prefix once, then one batch of all nine rows.
    rows = [e.packed_length - n for e in mmlu] + [e.packed_length for e in hellaswag]
    assert read == [n, 9 * max(rows)]


def test_nested_prefixes_of_two_tasks_change_nothing(tokenizer):
    """0-shot MMLU of two subjects under the description's opening, and ARC-Easy under
    "Question:": three levels of prefixes, each encoded once, and the same log-likelihoods
    as the brute force at any budget."""
    lm = make_tiny("llama", tokenizer, seed=24)
    rows = data.load_split("mmlu/test")
    subjects = [(i, r) for i, r in enumerate(rows) if r["subject"] == "abstract_algebra"][:5]
    subjects += [(i, r) for i, r in enumerate(rows) if r["subject"] == "anatomy"][:5]
    _, mmlu = encoded_requests(lm, "mmlu", subjects)
    _, arc = encoded_requests(lm, "arc_easy", data.select_items(TASKS["arc_easy"].split, 9).items)
    for i, enc in enumerate(arc):
        enc.doc_id = 10 ** 6 + i
    tree = tree_of(mmlu + arc)
    # The opening; two subjects under it (names of 5 and 4 tokens, saving 4 x 5 and 4 x 4);
    # and "Question:" (2 tokens, saving 8 x 2).
    assert multiple_choice.MIN_SAVED == 16
    assert tree.parents == [-1, 0, 0, -1] and tree.tokens[3] == common_prefix(
        [e.context for e in arc]) == tokenizer.encode("Question:")
    assert tree.node_of == [1] * 5 + [2] * 5 + [3] * 9

    reference = brute_force_sums(lm, mmlu + arc)
    assert forward.shared_prefix_ok(lm.model)
    for budget in (1, 40, 10 ** 6):
        sums, read = count_decoder_reads(lm, lambda: multiple_choice.choice_loglikelihoods(
            lm.model, mmlu + arc, budget))
        assert_same(sums, reference)
    lengths = [len(t) for t in tree.tokens]
    after = [e.packed_length - lengths[g] for e, g in zip(mmlu + arc, tree.node_of)]
    assert read == [2 * lengths[0], 2 * (max(lengths[1:3]) - lengths[0]), 19 * max(after)]


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
    monkeypatch.setattr(multiple_choice, "MIN_SAVED", 10 ** 6)  # no prefix worth sharing
    assert forward.fast_path_ok(lm.model)  # (its probe has branches, so it builds masks)
    built = []
    monkeypatch.setattr(forward, "packed_mask", lambda *a, **k: built.append(1))
    for budget in (1, 10 ** 6):
        sums = multiple_choice.choice_loglikelihoods(lm.model, encoded, budget)
        assert_same(sums, brute_force_sums(lm, encoded))
    assert not built
