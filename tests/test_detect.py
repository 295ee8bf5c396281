"""Detection finds planted super weights at their exact coordinates, in every dense family."""
from __future__ import annotations

import pytest
import torch

from sw_lib import arch, detect, prefix, tiny
from conftest import assert_bit_identical, make_tiny, weights_snapshot

DENSE_TYPES = ["llama", "mistral", "qwen2", "qwen3", "olmo", "olmo2", "gemma", "gemma2",
               "gemma3_text", "phi3", "gpt2", "gpt_neox"]


def test_every_dense_family_is_supported():
    covered = {arch.family_for_model_type(t).name for t in DENSE_TYPES}
    dense = {f.name for f in arch.FAMILIES if f.moe is None}
    assert covered == dense


@pytest.mark.parametrize("model_type", DENSE_TYPES)
def test_planted_super_weight_found_at_exact_coordinates(model_type, tokenizer, prompt_ids):
    lm = make_tiny(model_type, tokenizer)
    assert detect.detect_super_weights(lm, progress=False).candidates == []  # random: nothing
    tiny.plant_super_weight(lm.model, layer=2, row=37, column=101, input_ids=prompt_ids)
    snapshot = weights_snapshot(lm.model)
    result = detect.detect_super_weights(lm, progress=False)
    coords = [(c["layer"], c["row"], c["column"]) for c in result.candidates]
    assert coords == [(2, 37, 101)]
    c = result.candidates[0]
    assert c["co_occurs"] and c["input_token"] == 0 and c["output_token"] == 0
    assert c["output_value"] > c["input_value"] > detect.DEFAULT_THRESHOLD
    assert_bit_identical(lm.model, snapshot)  # detection and confirmation restored everything


def test_gpt2_conv1d_row_and_column_mean_output_and_input(tokenizer, prompt_ids):
    lm = make_tiny("gpt2", tokenizer)
    tiny.plant_super_weight(lm.model, layer=1, row=5, column=77, input_ids=prompt_ids)
    # Conv1D stores [in, out]: the planted scalar is weight[column, row].
    assert arch.down_proj(lm.model, 1).weight[77, 5] == 6.0
    coords = [(c["layer"], c["row"], c["column"]) for c in detect.detect_super_weights(lm, progress=False).candidates]
    assert coords == [(1, 5, 77)]


def test_one_column_feeding_several_rows_yields_every_row(tokenizer, prompt_ids):
    lm = make_tiny("llama", tokenizer)
    tiny.plant_super_weight(lm.model, layer=1, row=10, column=50, input_ids=prompt_ids,
                            value=6.0, extra_rows={20: 5.0, 30: 4.0})
    result = detect.detect_super_weights(lm, progress=False)
    found = [(c["iteration"], c["layer"], c["row"], c["column"]) for c in result.candidates]
    assert found == [(0, 1, 10, 50), (1, 1, 20, 50), (2, 1, 30, 50)]
    assert result.groups[0]["rows"] == [10, 20, 30] and len(result.groups) == 1
    assert [len(it["new"]) for it in result.iterations] == [1, 1, 1, 0]


def test_max_iterations_caps_the_loop(tokenizer, prompt_ids):
    lm = make_tiny("llama", tokenizer)
    tiny.plant_super_weight(lm.model, layer=1, row=10, column=50, input_ids=prompt_ids,
                            extra_rows={20: 5.0, 30: 4.0})
    result = detect.detect_super_weights(lm, max_iterations=2, progress=False)
    assert [c["row"] for c in result.candidates] == [10, 20]


def test_threshold_above_the_spike_finds_nothing(tokenizer, prompt_ids):
    lm = make_tiny("qwen2", tokenizer)
    tiny.plant_super_weight(lm.model, layer=1, row=10, column=50, input_ids=prompt_ids)
    assert detect.detect_super_weights(lm, spike_threshold=5000, progress=False).candidates == []


def test_statistics_in_float32_for_bfloat16_models(tokenizer, prompt_ids):
    lm = make_tiny("llama", tokenizer)
    tiny.plant_super_weight(lm.model, layer=2, row=37, column=101, input_ids=prompt_ids)
    lm.model.to(torch.bfloat16)
    maxima = detect.layer_maxima(lm.model, prompt_ids)
    assert all(isinstance(m.max_output, float) for m in maxima)
    assert (maxima[2].output_channel, maxima[2].input_channel) == (37, 101)


def test_confirmation_loss_ratio_equals_brute_force(tokenizer, prompt_ids):
    """The prefix reuse in confirmation gives the same loss as a full forward, per family."""
    for model_type in ("llama", "gpt2", "gemma2"):
        lm = make_tiny(model_type, tokenizer)
        tiny.plant_super_weight(lm.model, layer=2, row=37, column=101, input_ids=prompt_ids)
        result = detect.detect_super_weights(lm, reference_tokens=64, progress=False)
        ref = detect.reference_ids(tokenizer, 64)
        base = detect.mean_loss(lm.model, ref)
        with torch.no_grad():
            w = arch.down_proj_matrix(lm.model, 2)
            saved = w[37, 101].clone()
            w[37, 101] = 0
            zeroed = detect.mean_loss(lm.model, ref)
            w[37, 101] = saved
        assert result.reference["baseline_loss"] == pytest.approx(base, rel=1e-6)
        assert result.candidates[0]["loss_ratio"] == pytest.approx(zeroed / base, rel=1e-5)


def test_skip_layers_reproduces_the_full_forward(tokenizer, prompt_ids):
    lm = make_tiny("olmo2", tokenizer)
    full = lm.model(prompt_ids).logits
    with prefix.recording_inputs(lm.model, [3]) as inputs:
        lm.model(prompt_ids)
    with prefix.starting_at(lm.model, 3, inputs[3]):
        skipped = lm.model(prompt_ids).logits
    assert torch.equal(full, skipped)
    assert "forward" not in vars(arch.decoder_layers(lm.model)[0])  # patch removed


def test_bad_detection_parameters(tokenizer):
    lm = make_tiny("llama", tokenizer)
    with pytest.raises(ValueError, match="spike_threshold"):
        detect.detect_super_weights(lm, spike_threshold=0)
    with pytest.raises(ValueError, match="max_iterations"):
        detect.detect_super_weights(lm, max_iterations=0)


@pytest.mark.slow
def test_real_default_model_super_weights(smol):
    """SmolLM2-135M-Instruct: found and causally confirmed, all on residual channel 507."""
    snapshot = weights_snapshot(smol.model)
    result = detect.detect_super_weights(smol, progress=False)
    assert_bit_identical(smol.model, snapshot)
    confirmed = {(c["layer"], c["row"], c["column"]) for c in result.super_weights}
    # Measured with this toolkit (loss ratio on 512 WikiText-2 tokens): L2 1.109, L9 1.030, L11 1.579.
    assert confirmed == {(2, 507, 90), (9, 507, 200), (11, 507, 1229)}
    late = [c for c in result.candidates if c["layer"] >= 27]
    assert late and all(not c["confirmed"] and abs(c["loss_ratio"] - 1) < 0.01 for c in late)
    by_coord = {(c["layer"], c["row"], c["column"]): c for c in result.candidates}
    assert by_coord[(11, 507, 1229)]["loss_ratio"] > 1.5
    assert all(c["co_occurs"] and c["output_token"] == 0 for c in result.super_weights)


@pytest.mark.slow
def test_zeroing_the_default_models_super_weights_multiplies_perplexity(smol):
    from sw_lib import ablate
    from sw_lib.evaluate import perplexity

    weights = [(2, 507, 90), (9, 507, 200), (11, 507, 1229)]
    base = perplexity(smol, seq_len=512, n_windows=2, cache=False, progress=False)
    zeroed = perplexity(smol, ablate.zero(weights), seq_len=512, n_windows=2, cache=False,
                        progress=False)
    assert zeroed["perplexity"] / base["perplexity"] >= 5.0
    # The strongest one alone already does most of it.
    alone = perplexity(smol, ablate.zero([(11, 507, 1229)]), seq_len=512, n_windows=2,
                       cache=False, progress=False)
    assert alone["perplexity"] / base["perplexity"] >= 3.0
    print(base["perplexity"], alone["perplexity"], zeroed["perplexity"])
