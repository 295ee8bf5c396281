"""Zero / scale / restore of single weights is exact, exceptions included."""
from __future__ import annotations

import pytest
import torch

from sw_lib import ablate, arch

from conftest import assert_bit_identical, make_tiny, weights_snapshot


@pytest.mark.parametrize("model_type", ["llama", "gpt2", "phi3"])
def test_zero_and_restore_bit_exact(model_type, tokenizer):
    lm = make_tiny(model_type, tokenizer)
    snapshot = weights_snapshot(lm.model)
    edits = ablate.zero([(0, 3, 5), (1, 7, 9), (1, 7, 10)])
    with ablate.edited(lm.model, edits):
        for e in edits:
            assert arch.down_proj_matrix(lm.model, e.layer)[e.row, e.column] == 0
        changed = [k for k, v in lm.model.state_dict().items() if not torch.equal(v, snapshot[k])]
        assert len(changed) == 2  # layers 0 and 1 down projections, nothing else
    assert_bit_identical(lm.model, snapshot)


def test_restore_when_the_body_raises(tokenizer):
    lm = make_tiny("qwen3", tokenizer)
    snapshot = weights_snapshot(lm.model)
    with pytest.raises(RuntimeError, match="boom"):
        with ablate.zeroed(lm.model, [(1, 2, 3), (2, 4, 6)]):
            raise RuntimeError("boom")
    assert_bit_identical(lm.model, snapshot)


def test_scale_and_restore_in_bfloat16(tokenizer):
    lm = make_tiny("llama", tokenizer)
    lm.model.to(torch.bfloat16)
    snapshot = weights_snapshot(lm.model)
    w = arch.down_proj_matrix(lm.model, 1)
    original = w[4, 8].clone()
    with ablate.edited(lm.model, ablate.scale([(1, 4, 8)], 3.0)):
        assert w[4, 8] == (original * 3.0).to(torch.bfloat16)
    assert_bit_identical(lm.model, snapshot)


def test_same_weight_twice_restores_the_true_original(tokenizer):
    """Two edits of one scalar compound inside the block (x2 then x2: x4); on exit the scalar
    is its first saved value, not the once-scaled one the second edit saw."""
    lm = make_tiny("llama", tokenizer)
    snapshot = weights_snapshot(lm.model)
    w = arch.down_proj_matrix(lm.model, 1)
    original = w[4, 8].clone()
    with ablate.edited(lm.model, ablate.scale([(1, 4, 8), (1, 4, 8)], 2.0)):
        assert w[4, 8] == original * 4.0
    assert w[4, 8] == original
    assert_bit_identical(lm.model, snapshot)


def test_out_of_range_edit_is_refused_and_nothing_changes(tokenizer):
    lm = make_tiny("llama", tokenizer)
    snapshot = weights_snapshot(lm.model)
    with pytest.raises(IndexError, match="outside"):
        with ablate.zeroed(lm.model, [(0, 1, 1), (0, 10_000, 1)]):
            pass
    assert_bit_identical(lm.model, snapshot)


def test_edits_key_is_order_independent():
    a = ablate.zero([(1, 2, 3), (4, 5, 6)])
    b = ablate.zero([(4, 5, 6), (1, 2, 3)])
    assert ablate.edits_key(a) == ablate.edits_key(b) != ablate.edits_key(ablate.scale(a, 0.5))
    assert ablate.edits_key([]) == ()
    d = {"layer": 1, "row": 2, "column": 3, "expert": None, "shared": False}
    assert ablate.WeightEdit.from_dict(d) == ablate.WeightEdit(1, 2, 3)
