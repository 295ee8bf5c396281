"""Issue 11: super experts by the reference rule, skipping experts as an evaluation condition,
frequency-matched controls, and the relative spike threshold (dense and MoE)."""
from __future__ import annotations

import math
import random

import pytest
import torch

from sw_lib import ablate, arch, detect, edits, evaluate, hooks, moe, spikes, study

import tiny
import tiny_moe
from conftest import make_tiny, weights_snapshot


@pytest.fixture(autouse=True)
def one_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def assert_bit_identical(model, snapshot):
    for name, value in model.state_dict().items():
        assert torch.equal(value, snapshot[name]), name


# --- the reference rule on recorded maxima ---------------------------------------------------


def _percentile_by_hand(values: list[float], q: float) -> float:
    """numpy's default (linear) percentile, written out: position q/100 * (n - 1) of the sorted
    values, interpolated between its two neighbours."""
    ordered = sorted(values)
    position = q / 100 * (len(ordered) - 1)
    low = math.floor(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (position - low) * (ordered[high] - ordered[low])


def _reference_rule_by_hand(maxima: list[dict], num_layers: int) -> tuple[float, float, set]:
    """The reference code's rule: population = experts that saw a token in layers below
    round(0.75 L); flagged = above the 99.5th percentile and above max // 10 of that population."""
    limit = round(0.75 * num_layers)
    population = [m for m in maxima if m["layer"] < limit and m["tokens"] > 0]
    values = [m["max_output"] for m in population]
    percentile = _percentile_by_hand(values, 99.5)
    tenth = math.floor(max(values) / 10)
    flagged = {(m["layer"], m["expert"], m["shared"]) for m in population
               if m["max_output"] > percentile and m["max_output"] > tenth}
    return percentile, tenth, flagged


def _recorded_maxima(seed: int, num_layers: int = 8, experts: int = 16) -> list[dict]:
    rng = random.Random(seed)
    maxima = []
    for layer in range(num_layers):
        for e in range(experts):
            routed = rng.random() > 0.05
            maxima.append({"layer": layer, "expert": e, "shared": False,
                           "tokens": rng.randint(1, 500) if routed else 0,
                           "max_output": rng.uniform(0.5, 40.0) if routed else 0.0})
        maxima.append({"layer": layer, "expert": None, "shared": True, "tokens": 1000,
                       "max_output": rng.uniform(0.5, 40.0)})
    return maxima


@pytest.mark.parametrize("seed", range(5))
def test_rule_equals_a_brute_force_of_the_reference_and_a_final_layer_giant_hides_nothing(seed):
    maxima = _recorded_maxima(seed)
    # a super expert in layer 2, and a giant in the last layer (7 >= round(0.75 * 8) = 6) whose
    # tenth (1000) is above the super expert's peak: over all layers it would hide it
    maxima[2 * 17 + 5].update(tokens=300, max_output=900.0)
    maxima[7 * 17 + 1].update(tokens=300, max_output=10_000.0)
    maxima[1 * 17 + 9].update(tokens=0, max_output=0.0)  # never routed: no peak, not counted
    rule = moe.flag_super_experts(maxima, num_layers=8)
    percentile, tenth, flagged = _reference_rule_by_hand(maxima, 8)
    assert rule["layer_limit"] == 6 and rule["population"]["layers"] == [0, 1, 2, 3, 4, 5]
    assert rule["population"]["experts"] == sum(1 for m in maxima
                                                if m["layer"] < 6 and m["tokens"] > 0)
    assert rule["percentile_threshold"] == pytest.approx(percentile, rel=1e-12)
    assert rule["global_max"] == 900.0 and rule["global_threshold"] == tenth == 90.0
    assert {(m["layer"], m["expert"], m["shared"]) for m in rule["flagged"]} == flagged
    assert (2, 5, False) in flagged and all(m["layer"] < 6 for m in rule["flagged"])
    # the old, wrong population (every layer) loses the layer-2 super expert to the giant
    everyone = [m["max_output"] for m in maxima if m["tokens"] > 0]
    assert 900.0 < math.floor(max(everyone) / 10)


@pytest.mark.parametrize("num_layers, limit", [(1, 1), (2, 2), (4, 3), (6, 4), (10, 8),
                                               (24, 18), (48, 36), (94, 70)])
def test_layer_limit_is_pythons_round_of_three_quarters(num_layers, limit):
    assert moe.layer_limit(num_layers) == limit == round(0.75 * num_layers)


# --- skipping an expert in the evaluation engine ---------------------------------------------


def _without_expert(model, layer: int, expert: int | None):
    """Hooks that remove one expert's output by hand: the routed expert's weighted output
    recomputed from its weights and subtracted from the experts block's output, or the shared
    expert's output replaced by zeros."""
    if expert is None:
        return [(arch.shared_expert(model, layer), lambda m, a, out: torch.zeros_like(out))]
    block = arch.experts(model, layer)

    def subtract(module, args, kwargs, out):
        hidden = args[0] if args else kwargs["hidden_states"]
        index = args[1] if len(args) > 1 else kwargs["top_k_index"]
        weights = args[2] if len(args) > 2 else kwargs["top_k_weights"]
        weight = (weights * (index == expert)).sum(dim=-1, keepdim=True)
        gate, up = (hidden @ module.gate_up_proj[expert].t()).chunk(2, dim=-1)
        return out - weight * ((torch.nn.functional.silu(gate) * up) @ module.down_proj[expert].t())

    return [(block, subtract)]


def _window_nll_by_hand(model, windows: torch.Tensor) -> list[float]:
    with torch.no_grad():
        logp = model(windows).logits[:, :-1].double().log_softmax(-1)
    return (-logp.gather(2, windows[:, 1:, None])[..., 0].sum(dim=1)).tolist()


@pytest.mark.parametrize("model_type, layer, expert", [("qwen2_moe", 2, 5), ("qwen2_moe", 1, None),
                                                       ("mixtral", 1, 3)])
def test_skip_evaluation_equals_a_brute_force_forward_without_the_expert(
        model_type, layer, expert, tokenizer, tmp_path):
    from sw_lib.evaluate.perplexity import tokens_of

    lm = make_tiny(model_type, tokenizer)
    model = lm.model
    snapshot = weights_snapshot(model)
    cache = evaluate.EvalCache(tmp_path / "cache")
    kwargs = dict(seq_len=32, n_windows=3, batch_size=2, cache=cache, progress=False)
    skip = edits.skip([(layer, expert)])
    base = evaluate.perplexity(lm, keep_layers=[layer], **kwargs)
    assert cache.states.reused == 0
    skipped = evaluate.perplexity(lm, edits=skip, **kwargs)
    assert cache.states.reused == 2  # both batches started at the baseline's kept layer input
    assert_bit_identical(model, snapshot)

    tokens = tokens_of(tokenizer, None, "bundled")
    windows = torch.tensor([tokens[w * 32:(w + 1) * 32] for w in skipped["windows"]])
    kind = "forward" if expert is None else "forward_kwargs"
    with hooks.attached(_without_expert(model, layer, expert), kind=kind):
        by_hand = _window_nll_by_hand(model, windows)
    assert skipped["per_window_nll"] == pytest.approx(by_hand, rel=1e-4)
    assert base["per_window_nll"] == pytest.approx(_window_nll_by_hand(model, windows), rel=1e-4)
    assert max(abs(a - b) for a, b in zip(skipped["per_window_nll"], base["per_window_nll"])) > 1e-3

    again = evaluate.perplexity(lm, edits=skip, **kwargs)  # cached: nothing recomputed
    assert again["info"]["cached_windows"] == 3 and again["per_window_nll"] == \
        skipped["per_window_nll"]
    assert_bit_identical(model, snapshot)


# --- a planted super expert, end to end through the analysis ---------------------------------


@pytest.fixture(scope="module")
def planted_analysis(tokenizer):
    torch.set_num_threads(1)
    lm = make_tiny("mixtral", tokenizer)
    planted = tiny_moe.plant_super_expert(lm.model, moe.calibration_ids(tokenizer, 4, 32))
    snapshot = weights_snapshot(lm.model)
    settings = moe.MoESettings(router_analysis_samples=4, tokens_per_text=32, control_sets=2,
                               reference_tokens=128, seed=3, progress=False)
    evaluation = study.StudySettings(perplexity_samples=4, seq_len=64, accuracy_tasks=("arc_easy",),
                                     accuracy_samples=12, progress=False)
    document = moe.moe_analysis(lm, settings, evaluation, cache=False)
    return lm, planted, snapshot, document


def test_planted_super_expert_is_flagged_and_gets_the_super_weight_verdict(planted_analysis):
    lm, planted, snapshot, doc = planted_analysis
    assert_bit_identical(lm.model, snapshot)
    rule = doc["super_experts"]
    (flagged,) = rule["flagged"]
    assert (flagged["layer"], flagged["expert"], flagged["shared"]) == (1, 3, False)
    assert flagged["output_channel"] == planted["row"] and flagged["input_channel"] == planted["column"]
    assert rule["rule"].startswith("Su et al. 2025") and rule["layer_limit"] == 3
    assert flagged["verdict"] == "super_weight" and flagged["perplexity_ratio"] > 10
    # the expert super weight it holds, found on the prompt and judged the same way
    assert [(w["layer"], w["expert"], w["row"], w["column"], w["verdict"])
            for w in doc["expert_super_weights"]] == [(1, 3, 37, 5, "super_weight")]


def test_controls_are_frequency_matched_experts_of_the_same_layer(planted_analysis):
    lm, _, _, doc = planted_analysis
    p_active = {r["layer"]: r["p_active"] for r in doc["routing"]}
    target = p_active[1][3]
    nearest = sorted((e for e in range(8) if e != 3), key=lambda e: (abs(p_active[1][e] - target), e))
    sets = doc["controls"]["sets"]
    assert len(sets) == 2 and doc["controls"]["seed"] == 3
    for (control,) in sets:
        assert control["layer"] == 1 and control["expert"] in nearest[:4]
        assert control["p_active"] == p_active[1][control["expert"]]
        assert control["target_p_active"] == target and control["matched_to"] == "L1 E3"
    assert moe.matched_controls(doc["super_experts"]["flagged"], p_active, 2, 4, seed=3) == sets


def test_skipping_the_super_expert_is_catastrophic_and_the_controls_are_not(planted_analysis):
    _, _, _, doc = planted_analysis
    skipping = doc["skip_evaluation"]
    se = skipping["super_experts"]
    assert se["skipped"] == [{"layer": 1, "expert": 3, "shared": False}]
    assert se["perplexity_impact"]["impact_severity"] == "catastrophic"
    assert se["perplexity_impact"]["ratio_ci95"][0] > 10
    assert len(skipping["controls"]) == 2
    for control in skipping["controls"]:
        impact = control["perplexity_impact"]
        assert impact["impact_severity"] != "catastrophic" and impact["perplexity_ratio"] < 1.1
    assert set(se["accuracy_impacts"]) == {"arc_easy"}
    assert se["accuracy_impacts"]["arc_easy"]["n_samples"] == 12
    rows = moe.summary_rows(skipping)
    assert [r["condition"] for r in rows] == ["skip 1 super expert(s)",
                                              "skip control set 0 (1 expert(s))",
                                              "skip control set 1 (1 expert(s))"]
    assert "catastrophic" in moe.headline(doc)


# --- relative spike threshold ----------------------------------------------------------------


def test_relative_threshold_is_a_multiple_of_the_layers_median_token_peak(tokenizer, prompt_ids):
    lm = make_tiny("llama", tokenizer)
    model = lm.model
    # a super weight whose input spike (about 20) stays below the absolute threshold of 50
    tiny.plant_super_weight(model, 1, row=7, column=5, input_ids=prompt_ids, spike=20.0)
    found, _ = detect.find_candidates(model, prompt_ids, 50.0, max_iterations=2)
    assert found == []
    rule = spikes.SpikeThreshold("relative", 50.0, 5.0)
    # one iteration: once the weight is zeroed the input spike stays and, against a relative
    # bar, further rows of its column surface in later iterations (as the detector intends)
    found, iterations = detect.find_candidates(model, prompt_ids, rule, max_iterations=1)
    assert [(c["layer"], c["row"], c["column"]) for c in found] == [(1, 7, 5)]

    peaks = {}
    handles = [arch.down_proj(model, layer).register_forward_hook(
        lambda m, a, out, layer=layer: peaks.__setitem__(layer, (
            a[0][0].abs().amax(-1), out[0].abs().amax(-1))))
        for layer in range(arch.num_layers(model))]
    try:
        with torch.no_grad():
            model(prompt_ids)
    finally:
        for handle in handles:
            handle.remove()
    for layer in iterations[0]["layers"]:
        x, y = peaks[layer["layer"]]
        assert layer["thresholds"]["input"] == pytest.approx(5.0 * _median(x))
        assert layer["thresholds"]["down_proj"] == pytest.approx(5.0 * _median(y))
    assert rule.to_dict()["spike_threshold_mode"] == "relative"


def _median(values: torch.Tensor) -> float:
    """The median as numpy takes it (the mean of the middle two for an even count)."""
    ordered = sorted(values.tolist())
    n = len(ordered)
    return ordered[n // 2] if n % 2 else (ordered[n // 2 - 1] + ordered[n // 2]) / 2


def test_relative_threshold_reaches_expert_readings(tokenizer, prompt_ids):
    lm = make_tiny("qwen2_moe", tokenizer)
    tiny_moe.plant_expert_super_weight(lm.model, 1, row=7, column=5, input_ids=prompt_ids,
                                       expert=3)
    rule = spikes.SpikeThreshold("relative", 1e6, 20.0)  # the absolute number plays no part
    scan = moe.expert_super_weight_scan(lm, "Apple Inc. is a worldwide tech company.", rule,
                                        max_iterations=1)
    assert scan["spike_rule"]["spike_threshold_mode"] == "relative"
    assert [(w["layer"], w["expert"], w["row"], w["column"]) for w in scan["super_weights"]] == \
        [(1, 3, 7, 5)]
    with pytest.raises(ValueError, match="spike_threshold_mode"):
        spikes.SpikeThreshold("percent", 50.0, 20.0)


def test_restore_after_skipping_and_weight_edits_together_is_bit_exact(tokenizer):
    lm = make_tiny("qwen2_moe", tokenizer)
    model = lm.model.to(torch.bfloat16)
    snapshot = weights_snapshot(model)
    mixed = [*edits.skip([(1, 3), (2, None)]), edits.WeightEdit(1, 7, 5, expert=4)]
    with ablate.edited(model, mixed):
        assert not arch.experts(model, 1).down_proj[3].any()
        assert arch.experts(model, 1).down_proj[4, 7, 5] == 0
    assert_bit_identical(model, snapshot)


def test_the_reference_params_set_loads_with_the_reference_calibration():
    from pathlib import Path

    from sw_lib import config

    params = Path(__file__).resolve().parents[1] / "params" / "super_experts_reference.yaml"
    cfg = config.load(params)
    assert (cfg["moe"]["router_analysis_samples"], cfg["moe"]["tokens_per_text"]) == (100, 2048)
    assert cfg["runtime"]["dtype"] == "bfloat16" and cfg["evaluation"]["seq_len"] == 2048
    default = config.load()
    assert (default["moe"]["router_analysis_samples"], default["moe"]["tokens_per_text"]) == \
        (32, 128)
    assert default["detection"]["spike_threshold_mode"] == "absolute"
    with pytest.raises(ValueError, match="spike_threshold_mode"):
        config.load(overrides={"detection.spike_threshold_mode": "percent"})
