"""sw_lib.edits: one protocol for every change; keys, JSON round trips, exact restore."""
from __future__ import annotations

import pytest
import torch

from sw_lib import ablate, arch, edits

import tiny
from conftest import assert_bit_identical, weights_snapshot


@pytest.fixture
def moe_model(tokenizer):
    return tiny.tiny_model("qwen2_moe", vocab_size=len(tokenizer), seed=5)


def test_keys_are_order_independent_across_kinds():
    a = [edits.WeightEdit(2, 1, 3), edits.ExpertSkip(1, 4), edits.ExpertSkip(1, None, True)]
    assert edits.edits_key(a) == edits.edits_key(reversed(a))
    assert edits.edits_key(a) != edits.edits_key(a[:2])
    assert edits.edits_key([]) == ()
    assert edits.first_layer(a) == 1 and edits.first_layer([]) is None
    assert edits.EditSet.of(a) == edits.EditSet.of(reversed(a))
    assert hash(edits.EditSet.of(a)) == hash(edits.EditSet.of(reversed(a)))


def test_json_round_trip_of_every_kind():
    for e in (edits.WeightEdit(2, 1, 3, expert=4, scale=0.5), edits.ExpertSkip(3, 7),
              edits.ExpertSkip(3, None, True)):
        assert edits.from_dict(e.to_dict()) == e
        assert e.to_dict()["kind"] == e.kind == e.key()[0]
    # JSON written before edits had kinds: a weight edit
    assert edits.from_dict({"layer": 1, "row": 2, "column": 3}) == edits.WeightEdit(1, 2, 3)
    with pytest.raises(ValueError, match="unknown edit kind 'spell'"):
        edits.from_dict({"kind": "spell"})


def test_an_expert_skip_names_one_expert():
    with pytest.raises(ValueError, match="routed expert or the shared one"):
        edits.ExpertSkip(1)
    with pytest.raises(ValueError, match="routed expert or the shared one"):
        edits.ExpertSkip(1, 2, shared=True)
    assert edits.skip([(1, 2), (1, None), {"layer": 0, "expert": None, "shared": True}]) == [
        edits.ExpertSkip(1, 2), edits.ExpertSkip(1, None, True), edits.ExpertSkip(0, None, True)]


@torch.no_grad()
def test_skipping_equals_zeroing_by_hand_and_restores_bit_exactly(moe_model, tokenizer):
    ids = tokenizer("Apple Inc. is a worldwide tech company.", return_tensors="pt").input_ids
    layer = arch.moe_layers(moe_model)[0]
    snapshot = weights_snapshot(moe_model)
    mixed = [edits.ExpertSkip(layer, 3), edits.ExpertSkip(layer, None, True),
             edits.WeightEdit(layer, 5, 7, expert=1)]
    with ablate.edited(moe_model, mixed):
        edited_logits = moe_model(ids).logits
    assert_bit_identical(moe_model, snapshot)
    # brute force: write the same changes by hand on a copy of the weights
    experts = arch.experts(moe_model, layer)
    shared = arch.shared_expert(moe_model, layer)
    experts.down_proj[3].zero_()
    shared.down_proj.weight.zero_()
    experts.down_proj[1, 5, 7] = 0.0
    by_hand = moe_model(ids).logits
    assert torch.equal(edited_logits, by_hand)
    for name, tensor in moe_model.state_dict().items():
        tensor.copy_(snapshot[name])


def test_restore_happens_when_the_block_raises(moe_model):
    snapshot = weights_snapshot(moe_model)
    layer = arch.moe_layers(moe_model)[0]
    with pytest.raises(RuntimeError, match="boom"):
        with ablate.edited(moe_model, [edits.ExpertSkip(layer, 0),
                                       edits.WeightEdit(layer, 1, 1, expert=2)]):
            raise RuntimeError("boom")
    assert_bit_identical(moe_model, snapshot)
    # an edit that cannot be applied (a dense weight in an MoE layer) undoes the ones before it
    with pytest.raises(AttributeError):
        with ablate.edited(moe_model, [edits.ExpertSkip(layer, 0), edits.WeightEdit(layer, 1, 1)]):
            pass
    assert_bit_identical(moe_model, snapshot)
