"""The on-disk cache: a repeated evaluation runs no forward pass; any change of condition misses."""
from __future__ import annotations

import pytest

from sw_lib.ablate import WeightEdit
from sw_lib.evaluate import EvalCache, perplexity, run_task

from conftest import assert_bit_identical, make_tiny, weights_snapshot

TEXT = " ".join(f"Sentence number {i} talks about super weights in language models." for i in range(12))



class ForwardCounter:
    """Counts forward passes through the embedding layer (every evaluation path uses it)."""

    def __init__(self, model):
        self.calls = 0
        self.handle = model.get_input_embeddings().register_forward_hook(self._hook)

    def _hook(self, module, args, output):
        self.calls += 1

    def take(self) -> int:
        calls, self.calls = self.calls, 0
        return calls


@pytest.fixture
def lm(tokenizer):
    return make_tiny("llama", tokenizer, seed=7)


def test_second_identical_evaluation_runs_no_forward_pass(lm, tmp_path):
    cache = EvalCache(tmp_path / "eval")
    counter = ForwardCounter(lm.model)
    first = run_task(lm, "arc_easy", 4, cache=cache, batch_size=2, progress=False)
    assert counter.take() > 0 and first["info"]["computed_items"] == 4
    again = run_task(lm, "arc_easy", 4, cache=cache, batch_size=2, progress=False)
    assert counter.take() == 0
    assert again["per_item"] == first["per_item"] and again["metrics"] == first["metrics"]
    assert again["info"]["cached_items"] == 4 and cache.hits == 4 and cache.misses == 4

    ppl = perplexity(lm, seq_len=16, n_windows=3, cache=cache, progress=False, text=TEXT)
    assert counter.take() > 0
    assert perplexity(lm, seq_len=16, n_windows=3, cache=cache, progress=False,
                      text=TEXT)["perplexity"] == ppl["perplexity"]
    assert counter.take() == 0

    # More items: only the new ones are computed.
    more = run_task(lm, "arc_easy", 6, cache=cache, batch_size=2, progress=False)
    assert more["info"]["computed_items"] == 2 and more["per_item"][:4] == first["per_item"]
    assert counter.take() > 0


def test_a_different_edit_or_protocol_misses(lm, tmp_path):
    cache = EvalCache(tmp_path / "eval")
    counter = ForwardCounter(lm.model)
    snapshot = weights_snapshot(lm.model)
    base = run_task(lm, "arc_easy", 3, cache=cache, progress=False)
    counter.take()

    edit = [WeightEdit(layer=1, row=3, column=5, scale=0.0)]
    zeroed = run_task(lm, "arc_easy", 3, edits=edit, cache=cache, progress=False)
    assert counter.take() > 0 and zeroed["info"]["computed_items"] == 3
    assert_bit_identical(lm.model, snapshot)  # the edit is undone after the evaluation
    # A real edit of a real weight changes the log-likelihoods.
    assert zeroed["per_item"][0]["loglikelihoods"] != base["per_item"][0]["loglikelihoods"]

    other = [WeightEdit(layer=1, row=3, column=5, scale=2.0)]
    run_task(lm, "arc_easy", 3, edits=other, cache=cache, progress=False)
    assert counter.take() > 0
    run_task(lm, "arc_easy", 3, edits=list(reversed(edit)), cache=cache, progress=False)
    assert counter.take() == 0  # same edits: a hit
    run_task(lm, "arc_challenge", 3, cache=cache, progress=False)
    assert counter.take() > 0  # another task

    # Identical weights give identical keys: a fresh copy of the model hits the same entries.
    twin = make_tiny("llama", lm.tokenizer, seed=7)
    assert twin.fingerprint == lm.fingerprint
    twin_counter = ForwardCounter(twin.model)
    assert run_task(twin, "arc_easy", 3, cache=cache, progress=False)["per_item"] == base["per_item"]
    assert twin_counter.take() == 0
    # Other weights miss (a folder given as a path works like an EvalCache).
    different = make_tiny("llama", lm.tokenizer, seed=8)
    different_counter = ForwardCounter(different.model)
    run_task(different, "arc_easy", 3, cache=tmp_path / "eval", progress=False)
    assert different_counter.take() > 0
    # Files: model 1 x {baseline, zeroed, scaled} + model 2 x baseline.
    assert len(list((tmp_path / "eval").glob("*/arc_easy/*.json"))) == 4


def test_another_engine_version_misses(lm, tmp_path, monkeypatch):
    """Results of an engine whose numerics differ are never paired with this one's."""
    from sw_lib.evaluate import cache as cache_mod

    cache = EvalCache(tmp_path / "eval")
    counter = ForwardCounter(lm.model)
    run_task(lm, "arc_easy", 2, cache=cache, progress=False)
    assert counter.take() > 0
    monkeypatch.setattr(cache_mod, "ENGINE_VERSION", cache_mod.ENGINE_VERSION + 1)
    again = run_task(lm, "arc_easy", 2, cache=cache, progress=False)
    assert counter.take() > 0 and again["info"]["computed_items"] == 2


def test_no_cache_and_default_location(lm, tmp_path, monkeypatch):
    counter = ForwardCounter(lm.model)
    run_task(lm, "arc_easy", 2, cache=False, batch_size=1, progress=False)
    first = counter.take()
    run_task(lm, "arc_easy", 2, cache=False, batch_size=1, progress=False)
    # Without a cache each run computes both items again: one forward per item, every time
    # (the first run also checked the packed path once).
    assert counter.take() == 2 and first > 2
    monkeypatch.setenv("SW_CACHE_DIR", str(tmp_path / "root"))
    assert EvalCache.default().root == tmp_path / "root" / "eval"
    result = run_task(lm, "arc_easy", 2, progress=False)  # cache=None: the default cache
    assert result["info"]["cache"].startswith(str(tmp_path / "root" / "eval"))


def test_damaged_cache_entry_is_recomputed(lm, tmp_path):
    cache = EvalCache(tmp_path / "eval")
    first = run_task(lm, "arc_easy", 2, cache=cache, progress=False)
    path = next((tmp_path / "eval").glob("*/arc_easy/*.json"))
    path.write_text("{not json")
    counter = ForwardCounter(lm.model)
    assert run_task(lm, "arc_easy", 2, cache=cache, progress=False)["per_item"] == first["per_item"]
    assert counter.take() > 0


def test_ablated_pass_starts_at_the_edited_layer(tokenizer, tmp_path):
    """With the baseline's layer inputs kept, an edit at layer 2 never runs layers 0-1 again."""
    lm = make_tiny("llama", tokenizer, seed=10)
    edit = [WeightEdit(layer=2, row=4, column=9, scale=0.0)]
    cache = EvalCache(tmp_path / "eval")
    run_task(lm, "hellaswag", 4, cache=cache, batch_size=2, progress=False, keep_layers=[2])
    base_ppl = perplexity(lm, seq_len=16, n_windows=2, batch_size=1, cache=cache, progress=False,
                          text=TEXT, keep_layers=[2])

    calls = {"layer0": 0, "layer3": 0}
    hooks = [lm.model.model.layers[0].mlp.register_forward_hook(
                 lambda *a: calls.__setitem__("layer0", calls["layer0"] + 1)),
             lm.model.model.layers[3].mlp.register_forward_hook(
                 lambda *a: calls.__setitem__("layer3", calls["layer3"] + 1))]
    reused = cache.states.reused
    task = run_task(lm, "hellaswag", 4, edits=edit, cache=cache, batch_size=2, progress=False)
    ppl = perplexity(lm, edit, seq_len=16, n_windows=2, batch_size=1, cache=cache, progress=False,
                     text=TEXT)
    for h in hooks:
        h.remove()
    assert calls["layer0"] == 0 and calls["layer3"] > 0  # layers 0-1 skipped, 2-3 computed
    assert cache.states.reused - reused == 2 + 2  # 2 MC batches + 2 windows
    # Identical to evaluating the edited model from scratch, without any reuse.
    plain_task = run_task(lm, "hellaswag", 4, edits=edit, cache=False, batch_size=2, progress=False)
    plain_ppl = perplexity(lm, edit, seq_len=16, n_windows=2, cache=False, progress=False, text=TEXT)
    for a, b in zip(task["per_item"], plain_task["per_item"]):
        assert a["loglikelihoods"] == pytest.approx(b["loglikelihoods"], abs=1e-6)
    assert ppl["per_window_nll"] == pytest.approx(plain_ppl["per_window_nll"], rel=1e-7)
    assert ppl["per_window_nll"] != base_ppl["per_window_nll"]  # the edit did act


def test_edits_made_outside_the_engine_never_poison_the_baseline(lm, tmp_path):
    """A caller's own ablate.zeroed block and a raw in-place write are keyed by what they are."""
    import torch

    from sw_lib import ablate

    cache = EvalCache(tmp_path / "eval")
    counter = ForwardCounter(lm.model)
    weight = WeightEdit(layer=1, row=3, column=5)
    base = run_task(lm, "arc_easy", 3, cache=cache, progress=False)
    assert base["info"]["weights"] == "as loaded"
    counter.take()

    # 1. Inside the caller's own block: the same condition as edits=[weight] (one entry).
    with ablate.zeroed(lm.model, [weight]):
        outside = run_task(lm, "arc_easy", 3, cache=cache, progress=False)
    assert counter.take() > 0 and outside["info"]["outside_edits"] == [weight.to_dict()]
    assert outside["per_item"] != base["per_item"]
    inside = run_task(lm, "arc_easy", 3, edits=[weight], cache=cache, progress=False)
    assert counter.take() == 0 and inside["per_item"] == outside["per_item"]
    again = run_task(lm, "arc_easy", 3, cache=cache, progress=False)
    assert counter.take() == 0 and again["per_item"] == base["per_item"]

    # 2. A raw in-place write: keyed by the weights' own fingerprint, never the loaded one's.
    matrix = lm.model.model.layers[1].mlp.down_proj.weight
    original = matrix[3, 5].item()
    with torch.no_grad():
        matrix[3, 5] = 0.0
    raw = run_task(lm, "arc_easy", 3, cache=cache, progress=False)
    assert counter.take() > 0 and raw["info"]["weights"].startswith("changed outside the engine")
    assert raw["per_item"] == outside["per_item"]  # the same weights as zeroing through ablate
    with torch.no_grad():
        matrix[3, 5] = original
    restored = run_task(lm, "arc_easy", 3, cache=cache, progress=False)
    assert counter.take() == 0 and restored["per_item"] == base["per_item"]
    assert restored["info"]["weights"] == "as loaded"
    # Entries: baseline, zeroed through ablate (shared by 1.), zeroed by hand (its own model).
    assert len(list((tmp_path / "eval").glob("*/arc_easy/*.json"))) == 3


def test_ablated_generation_prefills_from_the_edited_layer(tokenizer, tmp_path):
    """GSM8K: an edit at layer 2 never encodes a prompt through layers 0-1 again (their keys
    and values come from the baseline), and generates what a from-scratch run generates."""
    import dataclasses

    from sw_lib.evaluate import TASKS

    lm = make_tiny("llama", tokenizer, seed=10)
    spec = dataclasses.replace(TASKS["gsm8k"], max_gen_toks=5)
    cache = EvalCache(tmp_path / "eval")
    run_task(lm, spec, 3, shots=0, cache=cache, progress=False, keep_layers=[2])
    edit = [WeightEdit(layer=2, row=4, column=9, scale=-3000.0)]  # strong enough to change text

    prefill_lengths = []  # sequence lengths layer 0 sees (1 = a decoding step)
    handle = lm.model.model.layers[0].mlp.register_forward_hook(
        lambda m, args, out: prefill_lengths.append(args[0].shape[1]))
    reused = cache.states.reused
    ablated = run_task(lm, spec, 3, shots=0, edits=edit, cache=cache, progress=False)
    handle.remove()
    assert cache.states.reused - reused == 3 and set(prefill_lengths) == {1}
    plain = run_task(lm, spec, 3, shots=0, edits=edit, cache=False, progress=False)
    assert [it["generation"] for it in ablated["per_item"]] == \
        [it["generation"] for it in plain["per_item"]]
    baseline = run_task(lm, spec, 3, shots=0, cache=False, progress=False)
    assert [it["generation"] for it in baseline["per_item"]] != \
        [it["generation"] for it in plain["per_item"]]  # the edit did act


def test_zero_shot_mmlu_rows_start_at_the_edited_layer_and_equal_a_fresh_run(tokenizer, tmp_path):
    """0-shot MMLU rows run after their shared description, read from a key/value cache: an
    ablated condition still starts them at its edited layer from the baseline's kept inputs,
    with the same result."""
    lm = make_tiny("llama", tokenizer, seed=20)
    cache = EvalCache(tmp_path / "eval")
    run_task(lm, "mmlu", 5, cache=cache, batch_size=2, progress=False, keep_layers=[2])
    edit = [WeightEdit(layer=2, row=4, column=9, scale=-3000.0)]
    reused = cache.states.reused
    ablated = run_task(lm, "mmlu", 5, edits=edit, cache=cache, batch_size=2, progress=False)
    assert cache.states.reused - reused == 3  # every batch (2 + 2 + 1 questions)
    plain = run_task(lm, "mmlu", 5, edits=edit, cache=False, batch_size=2, progress=False)
    baseline = run_task(lm, "mmlu", 5, cache=False, batch_size=2, progress=False)
    for a, b in zip(ablated["per_item"], plain["per_item"]):
        assert a["loglikelihoods"] == pytest.approx(b["loglikelihoods"], abs=1e-5)
    assert any(a["loglikelihoods"] != pytest.approx(c["loglikelihoods"], abs=1e-3)
               for a, c in zip(ablated["per_item"], baseline["per_item"]))  # the edit did act


def test_rows_after_a_cached_prefix_are_kept_by_the_prefix_tokens(tokenizer):
    """Two groups of questions whose rows after their prefixes are the same tokens, but whose
    prefixes differ: an ablated pass reuses the baseline's kept layer inputs only for the group
    they were recorded with, and equals a fresh computation for both."""
    import torch

    from sw_lib.ablate import edited
    from sw_lib.evaluate import forward
    from sw_lib.evaluate.multiple_choice import Encoded, choice_loglikelihoods
    from sw_lib.evaluate.prefix import LayerStates, make_plan

    lm = make_tiny("llama", tokenizer, seed=22)
    g = torch.Generator().manual_seed(0)
    tokens = lambda n: torch.randint(5, 1000, (n,), generator=g).tolist()  # noqa: E731
    rests, choices = [tokens(6), tokens(9)], [[tokens(1), tokens(2)] for _ in range(2)]
    first, second = tokens(10), tokens(10)
    group = lambda prefix: [Encoded(i, prefix + rest, cont)  # noqa: E731
                            for i, (rest, cont) in enumerate(zip(rests, choices))]
    assert forward.shared_prefix_ok(lm.model)
    states = LayerStates()
    baseline = make_plan(states, "weights", [], keep_layers=[2])
    choice_loglikelihoods(lm.model, group(first), 10 ** 6, plan=baseline)
    edit = [WeightEdit(layer=2, row=4, column=9, scale=-3000.0)]
    ablated = make_plan(states, "weights", edit)
    with edited(lm.model, edit):
        fresh = {name: choice_loglikelihoods(lm.model, group(prefix), 10 ** 6)
                 for name, prefix in (("first", first), ("second", second))}
        other = choice_loglikelihoods(lm.model, group(second), 10 ** 6, plan=ablated)
        assert states.reused == 0  # recorded after another prefix: not reused
        same = choice_loglikelihoods(lm.model, group(first), 10 ** 6, plan=ablated)
        assert states.reused == 1
    for got, want in ((other, fresh["second"]), (same, fresh["first"])):
        for doc_id in want:
            assert got[doc_id] == pytest.approx(want[doc_id], abs=1e-5)
    assert fresh["first"][0] != pytest.approx(fresh["second"][0], abs=1e-3)  # prefixes matter
