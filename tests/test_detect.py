"""Detection finds planted super weights at their exact coordinates, in every dense family."""
from __future__ import annotations

import math

import pytest
import torch

from sw_lib import arch, detect, prefix, reference

import tiny
from conftest import assert_bit_identical, make_tiny, weights_snapshot

# Verdicts on a short reference with a small control: enough to exercise (and restore) them.
QUICK = dict(reference_tokens=64, control_largest=1, control_random=1, progress=False)

DENSE_TYPES = ["llama", "mistral", "qwen2", "qwen3", "olmo", "olmo2", "gemma", "gemma2",
               "gemma3_text", "phi3", "gpt2", "gpt_neox"]


def test_every_dense_family_is_supported():
    covered = {arch.family_for_model_type(t).name for t in DENSE_TYPES}
    dense = {f.name for f in arch.FAMILIES if f.moe is None}
    assert covered == dense


@pytest.mark.parametrize("model_type", DENSE_TYPES)
def test_planted_super_weight_found_at_exact_coordinates(model_type, tokenizer, prompt_ids):
    lm = make_tiny(model_type, tokenizer)
    assert detect.detect_super_weights(lm, **QUICK).candidates == []  # random: nothing
    tiny.plant_super_weight(lm.model, layer=2, row=37, column=101, input_ids=prompt_ids)
    snapshot = weights_snapshot(lm.model)
    result = detect.detect_super_weights(lm, **QUICK)
    coords = [(c["layer"], c["row"], c["column"]) for c in result.candidates]
    assert coords == [(2, 37, 101)]
    c = result.candidates[0]
    assert c["co_occurs"] and c["input_token"] == 0 and c["output_token"] == 0
    assert c["output_value"] > c["input_value"] > detect.DEFAULT_THRESHOLD
    assert "down_proj" in c["flagged_by"] and c["verdict"] in ("super_weight", "contributor",
                                                                "no_effect")
    assert_bit_identical(lm.model, snapshot)  # detection and verdicts restored everything


def test_gpt2_conv1d_row_and_column_mean_output_and_input(tokenizer, prompt_ids):
    lm = make_tiny("gpt2", tokenizer)
    tiny.plant_super_weight(lm.model, layer=1, row=5, column=77, input_ids=prompt_ids)
    # Conv1D stores [in, out]: the planted scalar is weight[column, row].
    assert arch.down_proj(lm.model, 1).weight[77, 5] == 6.0
    coords = [(c["layer"], c["row"], c["column"])
              for c in detect.detect_super_weights(lm, confirm_candidates=False).candidates]
    assert coords == [(1, 5, 77)]


def test_one_column_feeding_several_rows_yields_every_row(tokenizer, prompt_ids):
    lm = make_tiny("llama", tokenizer)
    tiny.plant_super_weight(lm.model, layer=1, row=10, column=50, input_ids=prompt_ids,
                            value=6.0, extra_rows={20: 5.0, 30: 4.0})
    result = detect.detect_super_weights(lm, confirm_candidates=False)
    found = [(c["iteration"], c["layer"], c["row"], c["column"]) for c in result.candidates]
    assert found == [(0, 1, 10, 50), (1, 1, 20, 50), (2, 1, 30, 50)]
    assert result.groups[0]["rows"] == [10, 20, 30] and len(result.groups) == 1
    assert [len(it["new"]) for it in result.iterations] == [1, 1, 1, 0]


def test_max_iterations_caps_the_loop(tokenizer, prompt_ids):
    lm = make_tiny("llama", tokenizer)
    tiny.plant_super_weight(lm.model, layer=1, row=10, column=50, input_ids=prompt_ids,
                            extra_rows={20: 5.0, 30: 4.0})
    result = detect.detect_super_weights(lm, max_iterations=2, confirm_candidates=False)
    assert [c["row"] for c in result.candidates] == [10, 20]


def test_threshold_above_the_spike_finds_nothing(tokenizer, prompt_ids):
    lm = make_tiny("qwen2", tokenizer)
    tiny.plant_super_weight(lm.model, layer=1, row=10, column=50, input_ids=prompt_ids)
    assert detect.detect_super_weights(lm, spike_threshold=5000,
                                       confirm_candidates=False).candidates == []


def test_spike_behind_a_post_norm_gain_is_found(tokenizer, prompt_ids):
    """Gemma 3: the raw down-projection output stays below the threshold, the post-MLP norm's
    learned gain makes it huge where it enters the residual stream: found by that reading."""
    lm = make_tiny("gemma3_text", tokenizer)
    tiny.plant_super_weight(lm.model, layer=2, row=37, column=101, input_ids=prompt_ids,
                            value=0.1)
    assert detect.detect_super_weights(lm, confirm_candidates=False).candidates == []
    tiny.set_post_norm_gain(lm.model, layer=2, row=37, gain=20.0)
    m = detect.layer_maxima(lm.model, prompt_ids)[2]
    assert m.max_input > 50 > m.max_output and m.output_channel == 37
    assert m.max_post_norm > 50 and m.post_norm_channel == 37
    result = detect.detect_super_weights(lm, **QUICK)
    assert [(c["layer"], c["row"], c["column"]) for c in result.candidates] == [(2, 37, 101)]
    assert result.candidates[0]["flagged_by"] == ["post_norm"]
    assert result.candidates[0]["post_norm_value"] == pytest.approx(m.max_post_norm)


def test_a_spike_both_readings_see_is_flagged_by_both(tokenizer, prompt_ids):
    lm = make_tiny("gemma2", tokenizer)
    tiny.plant_super_weight(lm.model, layer=1, row=5, column=77, input_ids=prompt_ids)
    tiny.set_post_norm_gain(lm.model, layer=1, row=5, gain=20.0)
    (c,) = detect.detect_super_weights(lm, confirm_candidates=False).candidates
    assert (c["layer"], c["row"], c["column"]) == (1, 5, 77)
    assert c["flagged_by"] == ["down_proj", "post_norm"]


def test_post_norm_read_only_where_a_layer_has_one(tokenizer, prompt_ids):
    for model_type, has_norm in (("gemma", False), ("llama", False), ("gemma2", True),
                                 ("gemma3_text", True)):
        lm = make_tiny(model_type, tokenizer)
        present = [arch.post_mlp_norm(lm.model, i) is not None for i in range(4)]
        assert present == [has_norm] * 4
        maxima = detect.layer_maxima(lm.model, prompt_ids)
        assert all((m.max_post_norm is not None) == has_norm for m in maxima)
    with pytest.raises(ValueError, match="no post-MLP norm"):
        tiny.set_post_norm_gain(make_tiny("gemma", tokenizer).model, 1, 5, 20.0)


def test_statistics_in_float32_for_bfloat16_models(tokenizer, prompt_ids):
    lm = make_tiny("llama", tokenizer)
    tiny.plant_super_weight(lm.model, layer=2, row=37, column=101, input_ids=prompt_ids)
    lm.model.to(torch.bfloat16)
    maxima = detect.layer_maxima(lm.model, prompt_ids)
    assert all(isinstance(m.max_output, float) for m in maxima)
    assert (maxima[2].output_channel, maxima[2].input_channel) == (37, 101)


def test_effect_equals_brute_force_on_the_reference(tokenizer, prompt_ids):
    """The prefix reuse behind the verdicts gives the mean per-token NLL change of a full
    forward with the weight zeroed by hand, per family."""
    for model_type in ("llama", "gpt2", "gemma2"):
        lm = make_tiny(model_type, tokenizer)
        tiny.plant_super_weight(lm.model, layer=2, row=37, column=101, input_ids=prompt_ids)
        result = detect.detect_super_weights(lm, **QUICK)
        ref = reference.reference_text(tokenizer, 64).ids
        base = reference.token_nll(lm.model, ref)
        with torch.no_grad():
            w = arch.down_proj_matrix(lm.model, 2)
            saved = w[37, 101].clone()
            w[37, 101] = 0
            zeroed = reference.token_nll(lm.model, ref)
            w[37, 101] = saved
        c = result.candidates[0]
        assert result.reference["baseline_loss"] == pytest.approx(float(base.mean()), rel=1e-6)
        assert c["effect"] == pytest.approx(float((zeroed - base).double().mean()), abs=1e-6)
        assert c["perplexity_ratio"] == pytest.approx(math.exp(c["effect"]))


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
    with pytest.raises(ValueError, match="reference_tokens must be between 2 and 1024"):
        detect.detect_super_weights(lm, reference_tokens=5000)
    with pytest.raises(ValueError, match="super_ratio must be above 1"):
        detect.detect_super_weights(lm, super_ratio=0.5)
    with pytest.raises(ValueError, match="control_largest and control_random"):
        detect.detect_super_weights(lm, control_random=-1)


@pytest.mark.slow
def test_real_default_model_verdicts(smol):
    """SmolLM2-135M-Instruct: one super weight, L11 [507, 1229]; the two earlier weights of
    row 507 are at most contributors; the 26 late-layer spikes have no effect.

    Measured with this toolkit (512 reference tokens, default control): perplexity ratio L11
    6.79 (control's largest 1.10), L2 1.66 (control 1.44: W[507, 430] of the same layer),
    L9 1.16 (control 1.0001); every late spike's interval reaches below 1.
    """
    from sw_lib import verdict

    snapshot = weights_snapshot(smol.model)
    result = detect.detect_super_weights(smol, progress=False)
    assert_bit_identical(smol.model, snapshot)
    by_coord = {(c["layer"], c["row"], c["column"]): c for c in result.candidates}
    for row in verdict.verdict_rows(result.candidates):
        print(row)
    print(result.timing)
    assert [(c["layer"], c["row"], c["column"]) for c in result.super_weights] == [(11, 507, 1229)]
    top = by_coord[(11, 507, 1229)]
    assert top["perplexity_ratio_interval"][0] > 4 and top["control"]["max_perplexity_ratio"] < 1.5
    assert {by_coord[(2, 507, 90)]["verdict"], by_coord[(9, 507, 200)]["verdict"]} <= {
        "contributor", "no_effect"}
    late = [c for c in result.candidates if c["layer"] >= 27]
    assert len(late) == 26 and all(c["verdict"] == "no_effect" for c in late)
    assert all(c["co_occurs"] and c["output_token"] == 0 for c in result.super_weights)
    ref = result.reference
    assert ref["token_span"][1] == ref["total_tokens"] and ref["n_tokens"] == 512


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
