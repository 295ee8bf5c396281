"""Verdicts: planted weights get the verdict their own effect earns against a control."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from sw_lib import ablate, arch, detect, edits, models, reference, verdict

import tiny
from conftest import assert_bit_identical, weights_snapshot

PROMPT = "Apple Inc. is a worldwide tech company."
REFERENCE_TOKENS = 128  # 127 predicted tokens: 4 bootstrap blocks, enough for planted effects
CATASTROPHIC, MILD, NO_PATH = (1, 37, 101), (2, 37, 55), (3, 20, 80)


def _coord(w: dict) -> tuple:
    return w["layer"], w["row"], w["column"]


@pytest.fixture(scope="module")
def planted(tokenizer):
    """tiny.plant_verdict_examples: a tiny Llama that needs a massive activation on residual
    channel 37; L1 [37, 101] makes it (catastrophic when zeroed), L2 [37, 55] adds as much
    again (mild: L1 still holds the channel up), L3 [20, 80] spikes on channel 20, which the
    final norm cuts off (gain 0): no path to the predictions beyond the norm's scale."""
    ids = tokenizer(PROMPT, return_tensors="pt").input_ids
    model = tiny.tiny_model("llama", vocab_size=len(tokenizer))
    assert tiny.plant_verdict_examples(model, ids) == {
        "super_weight": CATASTROPHIC, "contributor": MILD, "no_effect": NO_PATH}
    lm = models.from_model(model, tokenizer, name="tiny-planted")
    snapshot = weights_snapshot(model)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # module fixtures run before conftest's one-thread fixture
    try:
        result = detect.detect_super_weights(lm, reference_tokens=REFERENCE_TOKENS,
                                             progress=False)
    finally:
        torch.set_num_threads(threads)
    return lm, result, snapshot


def test_catastrophic_and_mild_weights_are_super_weight_and_contributor(planted):
    lm, result, snapshot = planted
    assert_bit_identical(lm.model, snapshot)  # every condition and control was restored
    by_coord = {_coord(c): c for c in result.candidates}
    assert set(by_coord) == {CATASTROPHIC, MILD, NO_PATH}
    assert [_coord(w) for w in result.super_weights] == [CATASTROPHIC]
    assert [_coord(w) for w in result.contributors] == [MILD]

    sw, mild = by_coord[CATASTROPHIC], by_coord[MILD]
    assert sw["verdict"] == "super_weight" and mild["verdict"] == "contributor"
    # The numbers behind: catastrophic in absolute terms and far outside the control ...
    assert sw["perplexity_ratio"] >= 2.0 and sw["perplexity_ratio_interval"][0] >= 2.0
    assert sw["effect_interval"][0] > sw["control"]["max_abs_effect"]
    assert sw["effect"] >= 10 * sw["control"]["max_abs_effect"]
    # ... while the mild one is clearly above its control but not catastrophic.
    assert 1.0 < mild["perplexity_ratio"] < 2.0
    assert mild["effect_interval"][0] > mild["control"]["max_abs_effect"]
    assert result.to_dict()["verdict_counts"] == {"super_weight": 1, "contributor": 1,
                                                  "no_effect": 1}


def test_spike_without_causal_path_gets_no_effect(planted):
    _, result, _ = planted
    spike = next(c for c in result.candidates if _coord(c) == NO_PATH)
    # A real spike, input and output on one token, found at its exact coordinates ...
    assert spike["input_value"] > 50 and spike["output_value"] > 50 and spike["co_occurs"]
    # ... whose effect ordinary weights of its own column match.
    assert spike["verdict"] == "no_effect"
    assert spike["effect_interval"][0] <= spike["control"]["max_abs_effect"]


def test_effects_equal_a_brute_force_forward(planted, tokenizer):
    """Effects (candidates and controls) are the mean per-token NLL change of a full forward
    with the weight zeroed; the ratio is its exp; the interval brackets it."""
    lm, result, _ = planted
    ids = reference.reference_text(tokenizer, REFERENCE_TOKENS).ids
    base = reference.token_nll(lm.model, ids).double()
    mild = next(c for c in result.candidates if _coord(c) == MILD)
    control = mild["control"]["conditions"][0]
    for weight in (mild, control):
        with ablate.zeroed(lm.model, [weight]):
            expected = float((reference.token_nll(lm.model, ids).double() - base).mean())
        assert weight["effect"] == pytest.approx(expected, abs=1e-6)
        assert weight["perplexity_ratio"] == pytest.approx(math.exp(expected), rel=1e-6)
    low, high = mild["effect_interval"]
    assert low < mild["effect"] < high
    assert mild["perplexity_ratio_interval"] == pytest.approx([math.exp(low), math.exp(high)])
    assert result.reference["baseline_loss"] == pytest.approx(float(base.mean()))


def test_controls_are_ordinary_weights_of_the_same_matrix(planted):
    lm, result, _ = planted
    candidates = {_coord(c) for c in result.candidates}
    for c in result.candidates:
        controls = c["control"]["conditions"]
        matrix = arch.down_proj_matrix(lm.model, c["layer"]).detach()
        assert c["control"]["n"] == len(controls) == 3 + 2 + 2
        assert not candidates & {_coord(w) for w in controls}
        largest = [(w["row"], w["column"]) for w in controls if w["kind"] == "largest"]
        # Brute force: every weight of the matrix by |W|, candidates left out.
        order = sorted(((abs(float(matrix[r, k])), r, k) for r in range(matrix.shape[0])
                        for k in range(matrix.shape[1])
                        if (c["layer"], r, k) not in candidates), reverse=True)
        assert largest == [(r, k) for _, r, k in order[:3]]
        assert all(w["row"] == c["row"] for w in controls if w["kind"] == "row")
        assert all(w["column"] == c["column"] for w in controls if w["kind"] == "column")
        assert all(w["value"] == float(matrix[w["row"], w["column"]]) for w in controls)
        effects = [w["effect"] for w in controls]
        assert c["control"]["max_abs_effect"] == max(map(abs, effects))
        assert c["control"]["max_perplexity_ratio"] == pytest.approx(math.exp(max(effects)))


def test_random_controls_are_seeded_and_shared_by_row_and_column(tokenizer):
    model = tiny.tiny_model("llama", vocab_size=len(tokenizer))
    weights = [{"layer": 1, "row": 5, "column": 9}, {"layer": 1, "row": 5, "column": 11},
               {"layer": 2, "row": 5, "column": 9}]
    first = verdict.weight_controls(model, weights, largest=2, randoms=3, seed=0)
    assert first == verdict.weight_controls(model, weights, largest=2, randoms=3, seed=0)
    other = verdict.weight_controls(model, weights, largest=2, randoms=3, seed=1)
    assert [w for w in first[0] if w["kind"] == "row"] != [w for w in other[0] if w["kind"] == "row"]

    def kind(controls, name):
        return [_coord(w) for w in controls if w["kind"] == name]
    # Same matrix: the same largest weights; same row: the same random row weights.
    assert kind(first[0], "largest") == kind(first[1], "largest")
    assert kind(first[0], "row") == kind(first[1], "row")
    assert kind(first[0], "column") != kind(first[1], "column")
    assert {w[0] for w in kind(first[2], "largest")} == {2}  # layer 2 has its own
    for controls in first[:2]:  # neither candidate of layer 1 is anyone's control
        assert not {(1, 5, 9), (1, 5, 11)} & set(kind(controls, "row") + kind(controls, "column"))


def test_group_members_earn_their_own_verdicts(tokenizer):
    """One spiking column feeding two rows: the group's joint effect is catastrophic, yet the
    second row, zeroed alone, lowers the loss: its verdict is its own."""
    ids = tokenizer(PROMPT, return_tensors="pt").input_ids
    model = tiny.tiny_model("llama", vocab_size=len(tokenizer))
    tiny.rely_on_channel(model, row=10)
    tiny.plant_super_weight(model, 1, 10, 50, ids, value=1.0, extra_rows={20: 0.3})
    lm = models.from_model(model, tokenizer, name="tiny-group")
    result = detect.detect_super_weights(lm, reference_tokens=REFERENCE_TOKENS,
                                         control_largest=1, control_random=1, progress=False)
    verdicts = {_coord(c): c["verdict"] for c in result.candidates}
    assert verdicts == {(1, 10, 50): "super_weight", (1, 20, 50): "no_effect"}
    (group,) = result.groups
    assert group["rows"] == [10, 20] and group["verdict"] == "super_weight"
    ref = reference.reference_text(tokenizer, REFERENCE_TOKENS).ids
    base = reference.token_nll(lm.model, ref).double()
    with ablate.zeroed(lm.model, [(1, 10, 50), (1, 20, 50)]):
        joint = float((reference.token_nll(lm.model, ref).double() - base).mean())
    assert group["effect"] == pytest.approx(joint, abs=1e-6)
    # Its control: every member's control weights (measured for it although the second
    # member, below zero on its own, needed none).
    assert result.candidates[1]["control"] == {**verdict.control_summary([]), "measured": False}
    members = verdict.weight_controls(lm.model, result.candidates, 1, 1)
    assert group["control"]["n"] == len({_coord(w) for ws in members for w in ws})


@pytest.mark.parametrize("effect, interval, control, expected", [
    (1.0, (0.8, 1.2), [0.01, -0.05], "super_weight"),   # ratio e^1 = 2.7, far outside
    (1.0, (0.8, 1.2), [0.2], "contributor"),            # catastrophic, but only 5x the control
    (0.3, (0.2, 0.4), [0.01], "contributor"),           # clearly above, ratio 1.35 < 2
    (0.3, (0.2, 0.4), [-0.15], "contributor"),          # a control that lowers the loss counts
    (0.3, (0.2, 0.4), [-0.3], "no_effect"),             # ... by its size: 0.2 is not above 0.3
    (1.0, (0.005, 2.0), [0.01], "no_effect"),           # interval reaches into the control
    (-0.5, (-0.6, -0.4), [0.0], "no_effect"),           # zeroing it helps
    (0.01, (0.005, 0.02), [], "contributor"),           # no control: above zero suffices
])
def test_the_rule(effect, interval, control, expected):
    rule = verdict.VerdictRule(super_ratio=2.0, control_multiple=10.0)
    measured = {"effect": effect, "effect_interval": list(interval),
                "perplexity_ratio": math.exp(effect)}
    summary = verdict.control_summary([{"effect": e} for e in control])
    assert rule.verdict(measured, summary) == expected


def test_block_bootstrap_units_are_consecutive_blocks():
    differences = torch.arange(10, dtype=torch.float32)
    sums, counts = verdict.block_sums(differences, 4)
    assert sums.tolist() == [6.0, 22.0, 17.0] and counts.tolist() == [4.0, 4.0, 2.0]
    # Blocks that all agree: the interval is the point; blocks that differ: a real interval.
    flat = verdict.effect_of(torch.full((64,), 0.5), verdict.VerdictRule())
    assert flat["effect_interval"] == pytest.approx([0.5, 0.5])
    noisy = verdict.effect_of(torch.tensor(np.repeat([0.0, 1.0], 32), dtype=torch.float32),
                              verdict.VerdictRule(block_tokens=8))
    assert noisy["effect"] == pytest.approx(0.5)
    assert 0.0 < noisy["effect_interval"][0] < 0.5 < noisy["effect_interval"][1] < 1.0


def test_a_condition_that_breaks_the_model_is_the_largest_effect():
    broken = torch.zeros(64)
    broken[5] = float("nan")
    effect = verdict.effect_of(broken, verdict.VerdictRule())
    assert effect["non_finite"] and effect["effect_interval"] == [math.inf, math.inf]
    rule = verdict.VerdictRule()
    assert rule.verdict(effect, verdict.control_summary([{"effect": 0.1}])) == "super_weight"
    # ... and a control that breaks the model leaves nothing far outside it.
    candidate = verdict.effect_of(torch.full((64,), 3.0), rule)
    assert rule.verdict(candidate, verdict.control_summary([effect])) == "no_effect"


def test_without_the_causal_test_every_candidate_is_ablated(tokenizer):
    ids = tokenizer(PROMPT, return_tensors="pt").input_ids
    lm = models.from_model(tiny.tiny_model("llama", vocab_size=len(tokenizer)), tokenizer,
                           name="tiny")
    tiny.plant_super_weight(lm.model, 1, 10, 50, ids, extra_rows={20: 5.0})
    detection = detect.detect_super_weights(lm, confirm_candidates=False).to_dict()
    assert [c["verdict"] for c in detection["candidates"]] == [None, None]
    assert detection["super_weights"] == detection["candidates"]
    assert detection["contributors"] == [] and detection["verdict_rule"] is None
    assert "no causal test" in detection["super_weights_are"]
    assert detection["reference"] is None and [g["verdict"] for g in detection["groups"]] == [None]
    selection = verdict.ablation_selection(detection, include_contributors=False)
    assert selection["weights"] == detection["candidates"] and selection["verdicts"] is None
    assert "no verdicts" in verdict.verdict_summary(detection)


def test_ablation_selection_takes_super_weights_and_contributors_on_request():
    candidates = [{"layer": i, "row": 0, "column": 0, "verdict": v}
                  for i, v in enumerate(["no_effect", "contributor", "super_weight",
                                         "contributor"])]
    detection = {"candidates": candidates, "verdict_rule": {"super_ratio": 2.0},
                 "super_weights": [candidates[2]]}
    default = verdict.ablation_selection(detection)
    assert [w["layer"] for w in default["weights"]] == [2]
    assert default["verdicts"] == ["super_weight"]
    wider = verdict.ablation_selection(detection, include_contributors=True)
    assert [w["layer"] for w in wider["weights"]] == [1, 2, 3]  # detection order
    assert wider["verdicts"] == ["super_weight", "contributor"]
    # A detection written before verdicts existed: its super_weights list, as it was.
    old = {"candidates": candidates, "super_weights": [candidates[0]]}
    assert verdict.ablation_selection(old)["weights"] == [candidates[0]]


def test_a_skipped_expert_is_a_condition_like_any_weight_edit(tokenizer):
    """What issue 11 builds on: skipping an expert is measured and judged against skipped
    control experts with the same machinery (prefix reuse included)."""
    model = tiny.tiny_model("qwen3_moe", vocab_size=len(tokenizer))
    ids = reference.reference_text(tokenizer, 64).ids
    layer = arch.moe_layers(model)[1]
    meter = reference.Meter(model, ids, [layer])
    skip = edits.EditSet.skipping([(layer, 3)])
    with ablate.experts_skipped(model, [(layer, 3)]):
        expected = reference.token_nll(model, ids)
    assert torch.allclose(meter.nll(skip), expected, atol=1e-5)
    controls = [({"layer": layer, "expert": e}, edits.EditSet.skipping([(layer, e)]))
                for e in (0, 1)]
    (judged,) = verdict.judge(meter, [verdict.Case(skip, controls)], progress=False)
    # Random experts: whatever the verdict, it follows the rule, and the control experts were
    # measured exactly when the interval lies above zero.
    above = judged["effect_interval"][0] > 0
    assert judged["control"]["measured"] == above and judged["control"]["n"] == 2 * above
    assert judged["verdict"] == verdict.VerdictRule().verdict(judged, judged["control"])
    assert judged["effect"] == pytest.approx(float((expected - meter.baseline).double().mean()),
                                             abs=1e-6)
