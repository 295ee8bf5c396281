"""Ablation studies: severity rules, paired differences, grouping, and a study on a tiny model."""
from __future__ import annotations

import copy
import json
import math

import numpy as np
import pytest
import torch

from sw_lib import study
from sw_lib.ablate import WeightEdit
from sw_lib.evaluate import stats

from conftest import assert_bit_identical, weights_snapshot

# --- severity ------------------------------------------------------------------------------


@pytest.mark.parametrize("ratio, expected", [
    (0.5, "minimal"), (1.0, "minimal"), (1.1, "minimal"), (1.1000001, "mild"),
    (1.5, "mild"), (1.5000001, "moderate"), (3.0, "moderate"), (3.0000001, "severe"),
    (10.0, "severe"), (10.0000001, "catastrophic"), (1e6, "catastrophic"),
    (math.inf, "catastrophic"), (math.nan, "catastrophic"), (None, "catastrophic"),
])
def test_perplexity_severity_boundaries(ratio, expected):
    assert study.perplexity_severity(ratio) == expected


@pytest.mark.parametrize("drop, expected", [
    (-0.3, "minimal"), (0.0, "minimal"), (0.05, "minimal"), (0.0500001, "mild"),
    (0.1, "mild"), (0.1000001, "moderate"), (0.2, "moderate"), (0.2000001, "severe"),
    (0.5, "severe"), (0.5000001, "catastrophic"), (1.0, "catastrophic"),
    # Float subtraction lands a hair above an exact boundary; it must still count as equal.
    (0.4 - 0.3, "mild"), (0.7 - 0.2, "severe"), (0.25 - 0.05, "moderate"),
])
def test_accuracy_severity_boundaries(drop, expected):
    assert study.accuracy_severity(drop) == expected


# --- paired differences --------------------------------------------------------------------


def _items(correct, ids, metric="acc"):
    return [{"doc_id": i, "gold": 0, "pred": 0, "correct": {metric: int(c)}}
            for i, c in zip(ids, correct)]


def _two_sided_binomial(improved, worsened):
    d = improved + worsened
    return min(1.0, 2 * sum(math.comb(d, j) for j in range(min(improved, worsened) + 1)) / 2 ** d)


def test_paired_difference_equals_brute_force():
    rng = np.random.default_rng(0)
    n = 57
    base = rng.integers(0, 2, n)
    mod = np.where(rng.random(n) < 0.3, 1 - base, base)
    ids = [f"doc{i}" for i in range(n)]
    order = rng.permutation(n)  # the modified run lists items in another order
    got = study.paired_difference(_items(base, ids),
                                  _items(mod[order], [ids[i] for i in order]), "acc")

    d = mod.astype(float) - base.astype(float)
    mean = d.sum() / n
    se = math.sqrt(((d - mean) ** 2).sum() / (n - 1)) / math.sqrt(n)
    improved, worsened = int((d > 0).sum()), int((d < 0).sum())
    assert got["n"] == n and got["mean"] == pytest.approx(mean, abs=1e-12)
    assert got["stderr"] == pytest.approx(se, abs=1e-12)
    assert (got["n_improved"], got["n_worsened"]) == (improved, worsened)
    assert got["n_discordant"] == improved + worsened
    assert got["p_value"] == pytest.approx(_two_sided_binomial(improved, worsened), rel=1e-12)
    assert got["ci95"] == list(stats.paired_change_interval(improved, worsened, n))
    assert got["ci95"][0] < got["mean"] < got["ci95"][1]
    assert got["mde"] == stats.minimum_detectable_change(n, (improved + worsened) / n)
    assert got["significant"] == (got["p_value"] < 0.05)


def test_paired_difference_needs_the_same_items():
    with pytest.raises(ValueError, match="different items"):
        study.paired_difference(_items([1, 0], [0, 1]), _items([1, 0], [0, 2]), "acc")


def test_paired_difference_of_a_single_item_is_inconclusive():
    got = study.paired_difference(_items([1], [0]), _items([0], [0]), "acc")
    assert got["mean"] == -1.0 and got["stderr"] is None
    assert got["p_value"] == 1.0 and not got["significant"] and got["mde"] is None
    assert got["ci95"][0] == -1.0 and got["ci95"][1] > 0


def _task_result(correct, ids, other=None, primary="acc_norm"):
    other = 1 - np.asarray(correct) if other is None else np.asarray(other)
    items = [{"doc_id": i, "gold": 0, "pred": 0,
              "correct": {primary: int(c), "acc": int(o)}} for i, c, o in zip(ids, correct, other)]
    n = len(items)

    def metric(values):
        values = np.asarray(values, float)
        return {"value": float(values.mean()), "stderr": float(values.std(ddof=1) / math.sqrt(n))}

    return {"task": "t", "primary_metric": primary, "n_samples": n, "n_requested": n,
            "capped": False, "per_item": items,
            "metrics": {primary: metric(correct), "acc": metric(other)}}


def test_accuracy_impact_labels_severity_only_when_significant():
    ids = list(range(10))
    base = _task_result([1, 1, 1, 1, 1, 1, 0, 0, 0, 0], ids)
    mod = _task_result([1, 1, 0, 0, 0, 0, 0, 0, 0, 1], ids)
    got = study.accuracy_impact(base, mod)
    assert got["baseline_accuracy"] == pytest.approx(0.6)
    assert got["modified_accuracy"] == pytest.approx(0.3)
    assert got["accuracy_drop"] == pytest.approx(0.3)
    assert got["accuracy_ratio"] == pytest.approx(0.5)
    # A drop of 0.3 used to read "severe"; 4 worsened vs 1 improved of 10 is not significant.
    assert got["p_value"] == pytest.approx(_two_sided_binomial(1, 4))
    assert not got["significant"] and got["impact_severity"] == "inconclusive"
    assert got["n_samples"] == 10
    # Both metrics side by side, each with its own test (acc moves the other way here).
    assert set(got["metrics"]) == {"acc_norm", "acc"}
    assert got["metrics"]["acc"]["modified"]["value"] == pytest.approx(0.7)
    assert got["paired_difference"]["mean"] == pytest.approx(-0.3)
    assert got["metrics"]["acc"]["paired_difference"]["mean"] == pytest.approx(0.3)
    assert got["metrics"]["acc"]["impact_severity"] == "inconclusive"


def test_accuracy_impact_significant_drop_and_improvement():
    ids = list(range(30))
    base = _task_result([1] * 20 + [0] * 10, ids, other=[0] * 30)
    # acc_norm: 10 of the 20 correct items lost, none gained; acc: 8 gained, none lost.
    mod = _task_result([1] * 10 + [0] * 20, ids, other=[1] * 8 + [0] * 22)
    got = study.accuracy_impact(base, mod)
    norm, acc = got["metrics"]["acc_norm"], got["metrics"]["acc"]
    assert norm["paired_difference"]["p_value"] == pytest.approx(2 / 2 ** 10)
    assert got["significant"] and got["impact_severity"] == "severe"  # drop 1/3
    assert norm["impact_severity"] == "severe"
    assert acc["paired_difference"]["p_value"] == pytest.approx(2 / 2 ** 8)
    assert acc["paired_difference"]["significant"] and acc["impact_severity"] == "improved"


def _ppl(nll, tokens=99):
    nll = np.asarray(nll, float)
    return {"perplexity": math.exp(nll.sum() / (nll.size * tokens)), "per_window_nll": nll.tolist(),
            "n_windows": nll.size, "n_tokens": nll.size * tokens, "windows": list(range(nll.size)),
            "dataset_info": {"name": "wikitext"}}


def test_perplexity_impact_interval_and_verdict():
    rng = np.random.default_rng(1)
    base_nll = rng.normal(300, 20, 8)
    worse = study.perplexity_impact(_ppl(base_nll), _ppl(base_nll + 99 * np.log(4.0)))
    assert worse["perplexity_ratio"] == pytest.approx(4.0)
    assert worse["ratio_ci95"] == pytest.approx([4.0, 4.0])  # every window moved alike
    assert worse["significant"] and worse["impact_severity"] == "severe"
    assert worse["modified_perplexity_finite"] and worse["dataset_info"] == {"name": "wikitext"}

    # Windows that disagree: the ratio's interval holds 1, so no severity is given.
    mod_nll = base_nll + rng.normal(5, 60, 8)
    noisy = study.perplexity_impact(_ppl(base_nll), _ppl(mod_nll))
    assert noisy["ratio_ci95"] == list(stats.perplexity_ratio_interval(base_nll, mod_nll, 99))
    low, high = noisy["ratio_ci95"]
    assert low < 1 < high and not noisy["significant"]
    assert noisy["impact_severity"] == "inconclusive"


def test_destroyed_model_is_catastrophic_and_survives_json():
    from sw_lib import results

    base = _ppl([300.0, 310.0])
    destroyed = {**_ppl([300.0, 310.0]), "perplexity": math.inf,
                 "per_window_nll": [math.inf, math.inf]}
    got = study.perplexity_impact(base, destroyed)
    assert got["impact_severity"] == "catastrophic" and got["significant"]
    assert got["ratio_ci95"] is None
    written = json.loads(json.dumps(results.jsonable(got)))
    # inf becomes null; the explicit flag tells "destroyed" from "not measured".
    assert written["modified_perplexity"] is None and written["perplexity_ratio"] is None
    assert written["modified_perplexity_finite"] is False
    nan = study.perplexity_impact(base, {**destroyed, "perplexity": math.nan})
    assert nan["impact_severity"] == "catastrophic" and not nan["modified_perplexity_finite"]


def test_perplexity_impact_needs_the_same_windows():
    with pytest.raises(ValueError, match="different windows"):
        study.perplexity_impact(_ppl([1.0, 2.0]), {**_ppl([1.0, 2.0]), "windows": [0, 5]})


# --- conditions and labels -----------------------------------------------------------------


def _w(layer, row, column, expert=None, shared=False):
    return {"layer": layer, "row": row, "column": column, "expert": expert, "shared": shared,
            "loss_ratio": 2.0}


def test_labels():
    assert study.weight_label(_w(2, 3968, 7003)) == "L2 [3968, 7003]"
    assert study.weight_label(_w(1, 940, 711, expert=68)) == "L1 E68 [940, 711]"
    assert study.weight_label(_w(3, 5, 6, shared=True)) == "L3 shared [5, 6]"
    assert study.weight_label(WeightEdit(4, 1, 2)) == "L4 [1, 2]"


def test_ablation_units_by_weight_and_by_group():
    weights = [_w(2, 525, 808), _w(4, 525, 2723), _w(2, 1693, 808), _w(2, 1113, 808, expert=1)]
    by_weight = study.ablation_units(weights, "weight")
    assert [u["label"] for u in by_weight] == ["L2 [525, 808]", "L4 [525, 2723]",
                                               "L2 [1693, 808]", "L2 E1 [1113, 808]"]
    assert [len(u["edits"]) for u in by_weight] == [1, 1, 1, 1]
    assert by_weight[0]["edits"][0] == WeightEdit(2, 525, 808, None, False, 0.0)

    by_group = study.ablation_units(weights, "group")
    assert [u["label"] for u in by_group] == ["L2 [525/1693, 808]", "L4 [525, 2723]",
                                              "L2 E1 [1113, 808]"]
    assert by_group[0]["group"] == {"layer": 2, "column": 808, "expert": None, "shared": False,
                                    "rows": [525, 1693]}
    assert sorted(e.row for e in by_group[0]["edits"]) == [525, 1693]
    assert all(e.scale == 0.0 for u in by_group for e in u["edits"])
    with pytest.raises(ValueError, match="unknown ablation unit 'layer'"):
        study.ablation_units(weights, "layer")


def test_settings_defaults_are_the_default_params():
    from sw_lib import config

    evaluation = config.defaults()["evaluation"]
    defaults = study.StudySettings().to_dict()
    assert {k: evaluation[k] for k in defaults if k in evaluation} == {
        k: v for k, v in defaults.items() if k in evaluation}
    assert set(defaults) - set(evaluation) == {"progress", "resolved_token_budget"}


def test_settings_from_params_and_per_task_sizes():
    s = study.StudySettings.from_dict({"accuracy_samples": 7, "gsm8k_samples": 3,
                                       "mmlu_shots": 5, "accuracy_tasks": ["mmlu", "gsm8k"],
                                       "models": ["ignored"]})
    assert s.samples_for("mmlu") == 7 and s.samples_for("gsm8k") == 3
    assert s.shots_for("mmlu") == 5 and s.shots_for("hellaswag") is None
    assert s.tasks() == ("mmlu", "gsm8k")
    s.skip_accuracy = True
    assert s.tasks() == ()


# --- a study on a tiny model with planted super weights ------------------------------------

PROMPT = "Apple Inc. is a worldwide tech company."
PLANTED = [_w(1, 5, 7), _w(2, 11, 20), _w(2, 13, 20)]  # the last two share column 20


def _planted_model(tokenizer):
    from tiny import plant_super_weight, tiny_model

    model = tiny_model("llama", vocab_size=len(tokenizer))
    ids = tokenizer(PROMPT, return_tensors="pt").input_ids
    plant_super_weight(model, 1, 5, 7, ids)
    plant_super_weight(model, 2, 11, 20, ids, extra_rows={13: -4.0})
    return model


@pytest.fixture(scope="module")
def planted(tokenizer):
    from sw_lib.models import from_model

    return from_model(_planted_model(tokenizer), tokenizer, name="tiny-planted")


SETTINGS = dict(perplexity_samples=2, seq_len=32, accuracy_samples=4, accuracy_tasks=("arc_easy",),
                batch_size=4, progress=False)


def _zeroed_copy(lm, weights):
    """A separate model whose weights are zeroed by hand (the brute-force reference)."""
    from sw_lib.models import from_model

    model = copy.deepcopy(lm.model)
    with torch.no_grad():
        for w in weights:
            model.model.layers[w["layer"]].mlp.down_proj.weight[w["row"], w["column"]] = 0.0
    return from_model(model, lm.tokenizer, name="tiny-zeroed")


def _reference(lm, settings):
    """Perplexity and arc_easy of `lm` evaluated directly, without any cache."""
    from sw_lib import evaluate

    ppl = evaluate.perplexity(lm, seq_len=settings.seq_len, n_windows=settings.perplexity_samples,
                              batch_size=settings.batch_size, cache=False, progress=False)
    task = evaluate.run_task(lm, "arc_easy", n_samples=settings.accuracy_samples, cache=False,
                             batch_size=settings.batch_size, progress=False)
    return ppl, task


def test_individual_and_combined_equal_brute_force_zeroing(planted, tmp_path):
    from sw_lib.evaluate import EvalCache

    before = weights_snapshot(planted.model)
    settings = study.StudySettings(**SETTINGS)
    cache = EvalCache(tmp_path / "eval")
    reused = cache.states.reused
    # As the notebooks do: the baseline keeps the edited layers' inputs (layers 1 and 2).
    baseline = study.evaluate_condition(planted, [], settings, cache, keep_layers={1, 2})
    individual = study.individual_ablation(planted, PLANTED, settings, cache=cache,
                                           baseline=baseline)
    combined = study.combined_ablation(planted, PLANTED, settings, cache=cache, baseline=baseline)
    # Every ablated batch (4 conditions x 1 perplexity batch + 1 arc_easy batch) started at its
    # edited layer, and the results below still equal brute-force zeroing.
    assert cache.states.reused - reused == 4 * 2

    # The baseline was evaluated once: 4 conditions, every item computed, nothing looked up twice.
    per_condition = settings.perplexity_samples + settings.accuracy_samples
    assert cache.hits == 0 and cache.misses == 5 * per_condition

    conditions = [(a, a["super_weight"] and [a["super_weight"]]) for a in individual["analyses"]]
    conditions.append((combined, PLANTED))
    for result, weights in conditions:
        ref_ppl, ref_task = _reference(_zeroed_copy(planted, weights), settings)
        impact = result["perplexity_impact"]
        assert impact["modified_perplexity"] == pytest.approx(ref_ppl["perplexity"], rel=1e-5)
        assert impact["baseline_perplexity"] == pytest.approx(baseline.perplexity["perplexity"])
        acc = result["accuracy_impacts"]["arc_easy"]
        assert acc["modified_accuracy"] == ref_task["metrics"]["acc_norm"]["value"]
        assert acc["metrics"]["acc"]["modified"]["value"] == ref_task["metrics"]["acc"]["value"]
        assert acc["n_samples"] == 4
        # The paired statistics are those of the brute-force per-item outcomes.
        for metric in ("acc", "acc_norm"):
            was = {i["doc_id"]: i["correct"][metric] for i in baseline.tasks["arc_easy"]["per_item"]}
            now = {i["doc_id"]: i["correct"][metric] for i in ref_task["per_item"]}
            up = sum(now[k] > was[k] for k in was)
            down = sum(now[k] < was[k] for k in was)
            diff = acc["metrics"][metric]["paired_difference"]
            assert (diff["n_improved"], diff["n_worsened"]) == (up, down)
            assert diff["p_value"] == pytest.approx(_two_sided_binomial(up, down))
        # Windows are paired: the ratio's interval comes from the same per-window losses.
        assert impact["ratio_ci95"] == list(stats.perplexity_ratio_interval(
            baseline.perplexity["per_window_nll"], ref_ppl["per_window_nll"],
            settings.seq_len - 1))

    # Zeroing a planted weight changes the model's outputs; all together more than the first.
    ratios = [a["perplexity_impact"]["perplexity_ratio"] for a in individual["analyses"]]
    assert all(abs(math.log(r)) > 1e-3 for r in ratios), ratios
    assert combined["perplexity_impact"]["perplexity_ratio"] != pytest.approx(ratios[0])
    assert [a["label"] for a in individual["analyses"]] == ["L1 [5, 7]", "L2 [11, 20]",
                                                            "L2 [13, 20]"]
    # Every scalar is bit-identical after the study.
    assert_bit_identical(planted.model, before)

    # A rerun finds everything in the cache and computes nothing.
    hits = cache.hits
    again = study.individual_ablation(planted, PLANTED, settings, cache=cache)
    assert cache.misses == 5 * per_condition and cache.hits == hits + 4 * per_condition
    assert again["analyses"][1]["perplexity_impact"] == individual["analyses"][1]["perplexity_impact"]


def test_group_unit_zeroes_the_whole_column(planted, tmp_path):
    settings = study.StudySettings(**{**SETTINGS, "skip_accuracy": True})
    result = study.individual_ablation(planted, PLANTED, settings, unit="group",
                                       cache=tmp_path / "eval")
    assert [a["label"] for a in result["analyses"]] == ["L1 [5, 7]", "L2 [11/13, 20]"]
    group = result["analyses"][1]
    assert group["group"]["rows"] == [11, 13] and len(group["super_weights"]) == 2
    assert "super_weight" not in group and group["accuracy_impacts"] == {}
    ref_ppl, _ = _reference(_zeroed_copy(planted, PLANTED[1:]), study.StudySettings(**SETTINGS))
    assert group["perplexity_impact"]["modified_perplexity"] == pytest.approx(
        ref_ppl["perplexity"], rel=1e-5)


def test_skips_and_empty_weights(planted, tmp_path):
    from sw_lib.evaluate import EvalCache

    cache = EvalCache(tmp_path / "eval")
    settings = study.StudySettings(**{**SETTINGS, "skip_perplexity": True})
    result = study.combined_ablation(planted, PLANTED[:1], settings, cache=cache)
    assert result["perplexity_impact"] is None and list(result["accuracy_impacts"]) == ["arc_easy"]
    assert cache.misses == 2 * settings.accuracy_samples  # no perplexity window was evaluated

    nothing = study.combined_ablation(planted, [], settings, cache=cache)
    assert nothing["super_weights"] == [] and nothing["perplexity_impact"] is None
    assert nothing["accuracy_impacts"] == {} and cache.misses == 2 * settings.accuracy_samples


def _count_batches(lm):
    """Count decoder forward calls (one per evaluated batch)."""
    calls = []
    handle = lm.model.model.register_forward_hook(lambda *args: calls.append(1))
    return calls, handle


@pytest.mark.parametrize("weights, unit", [(PLANTED[:1], "weight"), (PLANTED[1:], "group")])
def test_no_condition_is_evaluated_twice_even_without_cache(planted, weights, unit):
    """One weight (or one (layer, column) group): all together is the individual condition."""
    settings = study.StudySettings(**SETTINGS)
    study.evaluate_condition(planted, [], settings, cache=False)  # one-time checks run first
    calls, handle = _count_batches(planted)
    try:
        baseline = study.evaluate_condition(planted, [], settings, cache=False)
        per_condition = len(calls)
        individual = study.individual_ablation(planted, weights, settings, unit=unit,
                                               cache=False, baseline=baseline)
        combined = study.combined_ablation(planted, weights, settings, cache=False,
                                           baseline=baseline)
    finally:
        handle.remove()
    assert per_condition > 0 and len(calls) == 2 * per_condition  # baseline + one condition
    assert combined["reused"] is True
    alone = individual["analyses"][0]
    assert combined["perplexity_impact"] == alone["perplexity_impact"]
    assert combined["accuracy_impacts"] == alone["accuracy_impacts"]

    # Two weights in different columns: the combined condition is new and is evaluated.
    calls, handle = _count_batches(planted)
    try:
        again = study.combined_ablation(planted, PLANTED[:2], settings, cache=False,
                                        baseline=baseline)
    finally:
        handle.remove()
    assert again["reused"] is False and len(calls) == per_condition
