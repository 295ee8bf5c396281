"""The weights' ledger: which changes since the fingerprint the active edit blocks explain."""
from __future__ import annotations

import torch

from sw_lib import ablate, arch
from sw_lib.ablate import WeightEdit

from conftest import make_tiny


def test_nested_blocks_explain_their_edits_and_nothing_else(tokenizer):
    lm = make_tiny("llama", tokenizer, seed=14)
    model = lm.model
    a, b = WeightEdit(1, 3, 5), WeightEdit(1, 4, 6, scale=2.0)
    assert ablate.outside_edits(model) == []
    with ablate.edited(model, [a]):
        assert ablate.outside_edits(model) == [a]
        with ablate.edited(model, [b]):  # the same matrix again, nested
            assert ablate.outside_edits(model) == [a, b]
        assert ablate.outside_edits(model) == [a]
    assert ablate.outside_edits(model) == []  # restored: the fingerprinted weights again

    matrix = model.model.layers[2].mlp.down_proj.weight
    with ablate.edited(model, [a]):
        with torch.no_grad():
            matrix[0, 0] += 1.0  # a write no block explains
        assert ablate.outside_edits(model) is None
        with torch.no_grad():
            matrix[0, 0] -= 1.0
    assert ablate.outside_edits(model) is None  # still unexplained until re-marked
    ablate.mark_unmodified(model)
    assert ablate.outside_edits(model) == []

    # A raw write inside a block to the block's own matrix is not explained by the block.
    edited_matrix = model.model.layers[1].mlp.down_proj.weight
    with ablate.edited(model, [a]):
        with torch.no_grad():
            edited_matrix[7, 7] = 3.0
        assert ablate.outside_edits(model) is None
    assert ablate.outside_edits(model) is None


def test_a_model_never_marked_is_unknown(tokenizer):
    lm = make_tiny("llama", tokenizer, seed=14)
    del lm.model.__dict__["_sw_ledger"]
    assert ablate.outside_edits(lm.model) is None


def test_skipped_experts_are_described_inside_and_forgotten_after(tokenizer):
    """A skipped expert is an edit like a weight edit: inside the block the ledger explains the
    zeroed slice by it (an evaluation keys its results by it); the bit-exact restore makes the
    weights known again."""
    from sw_lib import edits

    import tiny

    model = tiny.tiny_model("qwen3_moe", vocab_size=len(tokenizer), seed=3)
    ablate.mark_unmodified(model)
    with ablate.experts_skipped(model, [(1, 2)]):
        assert ablate.outside_edits(model) == [edits.ExpertSkip(1, 2)]
        with ablate.zeroed(model, [(0, 1, 2, 3)]):
            assert ablate.outside_edits(model) == [edits.ExpertSkip(1, 2),
                                                   edits.WeightEdit(0, 1, 2, 3)]
        with torch.no_grad():  # a raw write inside the block stays unexplained
            arch.experts(model, 1).down_proj[3, 0, 0] += 1.0
        assert ablate.outside_edits(model) is None
        with torch.no_grad():
            arch.experts(model, 1).down_proj[3, 0, 0] -= 1.0
    assert ablate.outside_edits(model) is None  # the raw writes were not undone by the block
