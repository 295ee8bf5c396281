"""The edit kinds of notebooks 06 and 07: activation restore, weight and activation quantization.
Each changes the model as its brute-force reference does, is a distinct cached condition, and
leaves every weight bit-exact."""
from __future__ import annotations

import pytest
import torch

from sw_lib import ablate, arch, edits, evaluate, hooks, models, quantize
from sw_lib.edits import ActivationQuantization, ActivationRestore, WeightQuantization

import tiny
from conftest import assert_bit_identical, weights_snapshot

PROMPT = "Apple Inc. is a worldwide tech company."
LAYER, ROW, COLUMN = 1, 5, 7


@pytest.fixture
def ids(tokenizer):
    return tokenizer(PROMPT, return_tensors="pt").input_ids


@pytest.fixture
def first_token_model(tokenizer, ids):
    """A tiny Llama whose super weight acts only through the first token's activation."""
    model = tiny.tiny_model("llama", vocab_size=len(tokenizer), hidden_act="relu")
    tiny.plant_first_token_super_weight(model, LAYER, ROW, COLUMN, ids, value=6.0)
    return model


@pytest.fixture
def planted(tokenizer, ids):
    """A tiny Llama with a super weight planted the usual way (SiLU MLP)."""
    model = tiny.tiny_model("llama", vocab_size=len(tokenizer))
    tiny.plant_super_weight(model, LAYER, ROW, COLUMN, ids, value=6.0)
    return model


def _down_outputs(model, ids) -> torch.Tensor:
    got = {}
    with hooks.attached([(arch.down_proj(model, LAYER),
                          lambda m, a, out: got.setdefault("y", out.detach().clone()))]):
        with torch.no_grad():
            logits = model(ids).logits
    return got["y"][0], logits


def _restore(model, min_value: float) -> ActivationRestore:
    value = float(arch.down_proj_matrix(model, LAYER)[ROW, COLUMN].detach())
    return ActivationRestore(LAYER, ROW, (COLUMN,), (value,), min_value)


def test_restore_brings_back_the_output_when_the_weight_acts_only_through_the_activation(
        first_token_model, ids):
    model = first_token_model
    snapshot = weights_snapshot(model)
    y, original = _down_outputs(model, ids)
    assert y[0, ROW].abs() > 1000  # the super activation: 6 x 200 on top of the rest
    zeroing = edits.zero([(LAYER, ROW, COLUMN)])
    with ablate.edited(model, zeroing):
        y_zeroed, zeroed = _down_outputs(model, ids)
    # zeroing changes the row at the first token alone (the channel is 0 elsewhere) ...
    assert torch.equal(y_zeroed[1:], y[1:]) and torch.equal(y_zeroed[0, :ROW], y[0, :ROW])
    assert (zeroed - original).abs().max() > 0.1  # ... and that changes the model's output
    with ablate.edited(model, zeroing + [_restore(model, 0.5 * float(y[0, ROW].abs()))]):
        y_restored, restored = _down_outputs(model, ids)
    assert float(y_restored[0, ROW]) == pytest.approx(float(y[0, ROW]), rel=1e-6)
    assert torch.allclose(restored, original, atol=1e-4, rtol=1e-5)
    assert_bit_identical(model, snapshot)


def test_restore_touches_only_the_massive_positions(planted, ids):
    y, _ = _down_outputs(planted, ids)
    zeroing = edits.zero([(LAYER, ROW, COLUMN)])
    with ablate.edited(planted, zeroing):
        y_zeroed, _ = _down_outputs(planted, ids)
    with ablate.edited(planted, zeroing + [_restore(planted, 0.5 * float(y[0, ROW].abs()))]):
        y_restored, _ = _down_outputs(planted, ids)
    massive = y[:, ROW].abs() >= 0.5 * y[0, ROW].abs()
    assert massive.tolist() == [True] + [False] * (len(massive) - 1)
    assert float(y_restored[0, ROW]) == pytest.approx(float(y[0, ROW]), rel=1e-6)
    assert torch.equal(y_restored[1:], y_zeroed[1:])  # the other tokens stay zeroed
    assert not torch.equal(y_zeroed[1:, ROW], y[1:, ROW])  # (where zeroing did change them)


def test_restore_does_nothing_to_an_unedited_model(planted, ids):
    y, logits = _down_outputs(planted, ids)
    with ablate.edited(planted, [_restore(planted, 1.0)]):
        y_again, logits_again = _down_outputs(planted, ids)
    assert torch.allclose(y_again, y, rtol=1e-6) and torch.allclose(logits_again, logits, atol=1e-5)


@pytest.mark.parametrize("block_size", [16, "row", "tensor"])
def test_weight_quantization_is_the_quantizer_on_every_decoder_matrix(planted, ids, block_size):
    snapshot = weights_snapshot(planted)
    matrices = {name: p for name, p in planted.named_parameters()
                if name.startswith("model.layers.") and p.dim() >= 2}
    naive = WeightQuantization.naive(4, block_size)
    aware = WeightQuantization.super_weight_aware(4, block_size, 3.0, [(LAYER, ROW, COLUMN)])
    for edit in (naive, aware):
        with ablate.edited(planted, [edit]):
            for name, p in planted.named_parameters():
                if name in matrices:
                    expected = quantize.blockwise(snapshot[name], 4, block_size, edit.clip_z)
                    if edit is aware and name == f"model.layers.{LAYER}.mlp.down_proj.weight":
                        expected[ROW, COLUMN] = snapshot[name][ROW, COLUMN]  # full precision
                    assert torch.equal(p, expected), name
                else:  # embeddings, norms, LM head: untouched
                    assert torch.equal(p, snapshot[name]), name
            with torch.no_grad():
                quantized_logits = planted(ids).logits
        assert_bit_identical(planted, snapshot)
        # brute force: the same weights written by hand give the same output
        with torch.no_grad():
            for name, p in planted.named_parameters():
                if name in matrices:
                    p.copy_(quantize.blockwise(snapshot[name], 4, block_size, edit.clip_z))
            if edit is aware:
                arch.down_proj_matrix(planted, LAYER)[ROW, COLUMN] = snapshot[
                    f"model.layers.{LAYER}.mlp.down_proj.weight"][ROW, COLUMN]
            assert torch.equal(planted(ids).logits, quantized_logits)
            planted.load_state_dict(snapshot)
    # the planted super weight (6.0 among ~0.02) ruins its block's levels unless kept
    down = f"model.layers.{LAYER}.mlp.down_proj.weight"
    others = torch.ones_like(snapshot[down][ROW], dtype=torch.bool)
    others[COLUMN] = False  # the error on the super weight's row, the weight itself aside

    def row_error(edit):
        with ablate.edited(planted, [edit]):
            return float((planted.get_parameter(down)[ROW] - snapshot[down][ROW])[others].abs().mean())
    if block_size == 16:  # one outlier among 16 has |z| < 3.75: clipping at z=3 still
        assert row_error(aware) <= row_error(naive)  # leaves it at ~4.9, the small weights
    else:  # all fall to one level either way; over larger blocks the clip pays
        assert row_error(aware) < row_error(naive)
    assert_bit_identical(planted, snapshot)


def test_activation_quantization_hooks_every_down_projection(first_token_model, ids):
    planted = first_token_model  # the spike sits at token 0 alone: one element to hold out
    snapshot = weights_snapshot(planted)
    raw, seen = {}, {}

    def capture(store, layer):
        return lambda m, args: store.__setitem__(layer, args[0].detach().clone())

    layers, errors = arch.dense_layers(planted), {}
    for edit in (ActivationQuantization(8), ActivationQuantization(8, ((LAYER, COLUMN),))):
        # hooks run in the order registered: `raw` sees each input before the edit's
        # pre-hook quantizes it, `seen` what the down projection then gets
        with hooks.attached([(arch.down_proj(planted, i), capture(raw, i)) for i in layers],
                            kind="pre"), ablate.edited(planted, [edit]), \
                hooks.attached([(arch.down_proj(planted, i), capture(seen, i)) for i in layers],
                               kind="pre"), torch.no_grad():
            planted(ids)
        assert float(raw[LAYER][0, 0, COLUMN]) > 100  # the planted spike
        for i in layers:  # brute force: the quantizer on each input, the held element by hand
            hold = torch.zeros_like(raw[i], dtype=torch.bool)
            if edit.hold_out and i == LAYER:
                hold[0, int(raw[i][0, :, COLUMN].abs().argmax()), COLUMN] = True
            assert torch.equal(seen[i], quantize.per_row_int(raw[i], 8, hold)), i
        if edit.hold_out:  # held out: passes exactly
            assert float(seen[LAYER][0, 0, COLUMN]) == float(raw[LAYER][0, 0, COLUMN])
        errors[edit.variant] = float((seen[LAYER][0] - raw[LAYER][0]).abs().mean())
    assert errors["hold_out"] < errors["naive"] / 4  # naive: the spike stretches the range
    assert_bit_identical(planted, snapshot)


def test_new_kinds_round_trip_and_key_apart():
    kinds = [ActivationRestore(2, 5, (7, 9), (6.0, -1.5), 300.0),
             WeightQuantization.naive(4, 64), WeightQuantization.naive(3, "row"),
             WeightQuantization.super_weight_aware(4, 64, 9.0, [{"layer": 2, "row": 5, "column": 7}]),
             ActivationQuantization(8), ActivationQuantization(8, ((2, 7),))]
    for e in kinds:
        assert edits.from_dict(e.to_dict()) == e
        assert e.to_dict()["kind"] == e.kind == e.key()[0]
    assert len({e.key() for e in kinds}) == len(kinds)
    assert [e.first_layer for e in kinds] == [2, 0, 0, 0, 0, 0]
    assert kinds[3].keep == ((2, 5, 7, None, False),) and kinds[3].variant == "super_weight_aware"
    with pytest.raises(ValueError, match="one original value per column"):
        ActivationRestore(1, 2, (3,), (), 1.0)
    with pytest.raises(ValueError, match="block_size must be"):
        WeightQuantization(4, 1)
    with pytest.raises(ValueError, match="clip_z must be positive"):
        WeightQuantization(4, 64, clip_z=0.0)


def test_engine_caches_each_condition_apart_and_restores_weights(planted, tokenizer, tmp_path):
    lm = models.from_model(planted, tokenizer, name="tiny-planted")
    snapshot = weights_snapshot(planted)
    cache = evaluate.EvalCache(tmp_path)
    conditions = [[], [WeightQuantization.naive(3, "tensor")],
                  [WeightQuantization.super_weight_aware(3, "tensor", 3.0, [(LAYER, ROW, COLUMN)])],
                  [ActivationQuantization(8)]]
    first = [evaluate.perplexity(lm, e, seq_len=32, n_windows=2, cache=cache, progress=False)
             for e in conditions]
    assert len({r["perplexity"] for r in first}) == len(conditions)  # four different conditions
    again = [evaluate.perplexity(lm, e, seq_len=32, n_windows=2, cache=cache, progress=False)
             for e in conditions]
    assert [r["info"]["cached_windows"] for r in again] == [2] * len(conditions)
    assert [r["per_window_nll"] for r in again] == [r["per_window_nll"] for r in first]
    assert_bit_identical(planted, snapshot)
    # the cached quantized result is the quantized model's, computed without the engine
    with ablate.edited(planted, conditions[1]):
        by_hand = evaluate.perplexity(lm, seq_len=32, n_windows=2, cache=False, progress=False)
    assert by_hand["per_window_nll"] == first[1]["per_window_nll"]


def test_scaling_by_one_is_the_baseline_bit_for_bit(planted, tokenizer):
    lm = models.from_model(planted, tokenizer, name="tiny-planted")
    baseline = evaluate.perplexity(lm, seq_len=32, n_windows=2, cache=False, progress=False)
    once = evaluate.perplexity(lm, edits.scale([(LAYER, ROW, COLUMN)], 1.0), seq_len=32,
                               n_windows=2, cache=False, progress=False)
    twice = evaluate.perplexity(lm, edits.scale([(LAYER, ROW, COLUMN)], 2.0), seq_len=32,
                                n_windows=2, cache=False, progress=False)
    assert once["per_window_nll"] == baseline["per_window_nll"]  # exactly
    assert twice["per_window_nll"] != baseline["per_window_nll"]
