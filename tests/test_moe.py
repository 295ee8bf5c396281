"""Mixture-of-experts analysis on tiny random MoE models of every supported family.

Planted super experts / expert super weights must be found at their exact coordinates, the
recomputed per-expert activations must add up to what the model's experts block computes, and
every zero/skip must restore the 3-D expert tensors bit-exactly.
"""
from __future__ import annotations

import math

import pytest
import torch

from sw_lib import ablate, arch, detect, moe, reference
from sw_lib.moe.super_weights import _reasons
from sw_lib.plots import moe as moe_plots

import tiny
import tiny_moe
from conftest import assert_bit_identical, make_tiny, weights_snapshot

MOE_TYPES = ["mixtral", "qwen2_moe", "olmoe", "qwen3_moe", "deepseek_v2", "deepseek_v3"]
WITH_SHARED = {"qwen2_moe", "deepseek_v2", "deepseek_v3"}
SOFTMAX_TOPK = {"mixtral": True, "qwen2_moe": False, "olmoe": False, "qwen3_moe": False}
PROMPT = "The company is a worldwide tech company."  # starts like many WikiText paragraphs


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models gain nothing from intra-op threads, and on a shared 2-core machine the
    threads' spin-waits made this module 3-4x slower; restore the setting afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def ids(tokenizer):
    return tokenizer(PROMPT, return_tensors="pt").input_ids


@pytest.fixture(scope="module")
def text_batch(tokenizer):
    return moe.calibration_ids(tokenizer, 4, 32)


# --- arch: module paths per family --------------------------------------------------------


@pytest.mark.parametrize("model_type", MOE_TYPES)
def test_family_paths_and_fused_shapes(model_type, tokenizer):
    lm = make_tiny(model_type, tokenizer)
    model, cfg = lm.model, lm.model.config
    dense_first = model_type.startswith("deepseek")
    assert arch.moe_layers(model) == ([1, 2, 3] if dense_first else [0, 1, 2, 3])
    assert arch.dense_layers(model) == ([0] if dense_first else [])
    if dense_first:  # DeepSeek's first_k_dense_replace layer is a plain MLP
        assert arch.down_proj_matrix(model, 0).shape == (cfg.hidden_size, cfg.intermediate_size)
    layer = 2
    experts = arch.experts(model, layer)
    e, h = 8, cfg.hidden_size
    i = experts.down_proj.shape[2]
    assert experts.gate_up_proj.shape == (e, 2 * i, h) and experts.down_proj.shape == (e, h, i)
    assert arch.router(model, layer).weight.shape == (e, h)
    assert arch.num_experts(model, layer) == e and arch.experts_per_token(model) == 2
    assert (arch.shared_expert(model, layer) is not None) == (model_type in WITH_SHARED)
    assert (arch.shared_expert_gate(model, layer) is not None) == (model_type == "qwen2_moe")
    view = arch.weight_matrix(model, layer, expert=5)
    assert view.shape == (h, i) and view.data_ptr() == experts.down_proj[5].data_ptr()
    if model_type in WITH_SHARED:
        shared = arch.weight_matrix(model, layer, shared=True)
        assert shared.data_ptr() == arch.shared_expert(model, layer).down_proj.weight.data_ptr()


@pytest.mark.parametrize("overrides, expected", [
    (dict(mlp_only_layers=[1]), [0, 2, 3]),
    (dict(decoder_sparse_step=2), [1, 3]),
])
def test_qwen_dense_layers_are_not_moe(overrides, expected, tokenizer):
    lm = make_tiny("qwen3_moe", tokenizer, **overrides)
    assert arch.moe_layers(lm.model) == expected
    assert sorted(arch.dense_layers(lm.model) + expected) == [0, 1, 2, 3]


# --- capture: recomputed experts == the model's own experts block --------------------------


@pytest.mark.parametrize("model_type", MOE_TYPES)
def test_recomputed_experts_add_up_to_the_block_output(model_type, tokenizer, text_batch):
    lm = make_tiny(model_type, tokenizer)
    model = lm.model
    actual, shared_actual, checked = {}, {}, []
    handles = []
    for layer in arch.moe_layers(model):
        handles.append(arch.experts(model, layer).register_forward_hook(
            lambda m, a, out, layer=layer: actual.__setitem__(layer, out.detach().float())))
        shared = arch.shared_expert(model, layer)
        if shared is not None:
            handles.append(shared.register_forward_hook(
                lambda m, a, out, layer=layer: shared_actual.__setitem__(
                    layer, out.detach().float().reshape(-1, out.shape[-1]))))

    def on_pass(p: moe.MoELayerPass):
        total = torch.zeros_like(p.hidden)
        for e in range(p.num_experts):
            tokens, inner, out = p.expert_activations(e)
            weight = (p.top_k_weights * (p.top_k_index == e)).sum(dim=-1)[tokens]
            total.index_add_(0, tokens, out * weight[:, None])
        torch.testing.assert_close(total, actual[p.layer], atol=1e-5, rtol=1e-4)
        if p.shared_input is not None:
            torch.testing.assert_close(p.shared_activations()[1], shared_actual[p.layer],
                                       atol=1e-5, rtol=1e-4)
        assert p.seq_len == text_batch.shape[1]
        checked.append(p.layer)

    try:
        moe.run_batches(model, [text_batch], on_pass)
    finally:
        for handle in handles:
            handle.remove()
    assert checked == arch.moe_layers(model)


# --- routing statistics ----------------------------------------------------------------------


@pytest.mark.parametrize("model_type", MOE_TYPES)
def test_p_active_sums_to_top_k_and_matches_brute_force(model_type, tokenizer, text_batch):
    lm = make_tiny(model_type, tokenizer)
    stats = moe.RoutingStats()
    moe.run_batches(lm.model, text_batch.split(2), stats)  # two passes accumulate
    routing = stats.to_list()
    assert [r["layer"] for r in routing] == arch.moe_layers(lm.model)
    for r in routing:
        assert r["tokens"] == text_batch.numel()
        assert sum(r["p_active"]) == pytest.approx(2.0, abs=1e-9)
        assert sum(r["count"]) == 2 * text_batch.numel()
        assert sum(r["sink"]["p_routed"]) == pytest.approx(2.0) and r["sink"]["texts"] == 4
        assert 0.0 <= r["router_entropy"] <= 1.0 and 0.0 <= r["usage_entropy"] <= 1.0
    if model_type not in SOFTMAX_TOPK:
        return
    # Brute force from the router logits the model itself reports.
    with torch.no_grad():
        logits = lm.model(text_batch, output_router_logits=True).router_logits
    for r, layer_logits in zip(routing, logits):
        probs = layer_logits.float().softmax(dim=-1)
        top = probs.topk(2, dim=-1)
        counts = torch.bincount(top.indices.flatten(), minlength=8)
        assert r["count"] == counts.tolist()
        weights = top.values / top.values.sum(-1, keepdim=True) if SOFTMAX_TOPK[model_type] \
            else top.values
        e = 4
        expected = weights[top.indices == e].mean().item() if counts[e] else None
        assert r["mean_weight"][e] == pytest.approx(expected, rel=1e-5)
        sink = top.indices.reshape(4, -1, 2)[:, 0]
        assert r["sink"]["p_routed"] == [(sink == e).any(-1).float().mean().item()
                                         for e in range(8)]
        entropy = -(probs * probs.log()).sum(-1).mean() / torch.log(torch.tensor(8.0))
        assert r["router_entropy"] == pytest.approx(entropy.item(), rel=1e-4)


def test_routing_ignores_the_no_expert_marker(tokenizer):
    """Expert parallelism marks "no local expert" with index E; it is not an expert."""
    lm = make_tiny("mixtral", tokenizer)
    experts = arch.experts(lm.model, 0)
    p = moe.MoELayerPass(layer=0, seq_len=2, hidden=torch.zeros(4, 64),
                         top_k_index=torch.tensor([[0, 8], [1, 0], [8, 8], [2, 0]]),
                         top_k_weights=torch.tensor([[0.5, 0.5], [0.25, 0.75], [1.0, 0.0],
                                                     [0.5, 0.5]]),
                         router_logits=None, experts_module=experts)
    stats = moe.RoutingStats()
    stats(p)
    (r,) = stats.to_list()
    assert r["count"] == [3, 1, 1, 0, 0, 0, 0, 0] and r["tokens"] == 4
    assert r["mean_weight"][:3] == [pytest.approx(1.75 / 3), 0.25, 0.5]
    assert r["sink"]["p_routed"][:3] == [0.5, 0.0, 0.0] and r["sink"]["mean_weight"][0] == 0.5
    assert r["router_entropy"] is None


# --- planted expert super weights --------------------------------------------------------------


def _plant(lm, ids, layer=None, shared_layer=2):
    model = lm.model
    layer = arch.moe_layers(model)[0] if layer is None else layer
    tiny_moe.plant_expert_super_weight(model, layer, row=7, column=5, input_ids=ids, expert=3)
    planted = {(layer, 3, False, 7, 5)}
    if arch.shared_expert(model, shared_layer) is not None:
        tiny_moe.plant_expert_super_weight(model, shared_layer, row=11, column=9, input_ids=ids,
                                           shared=True)
        planted.add((shared_layer, None, True, 11, 9))
    return planted


def _coords(weights):
    return {(w["layer"], w["expert"], w["shared"], w["row"], w["column"]) for w in weights}


@pytest.mark.parametrize("model_type", MOE_TYPES)
def test_planted_expert_super_weights_found_exactly(model_type, tokenizer, ids):
    lm = make_tiny(model_type, tokenizer)
    assert moe.detect_expert_super_weights(lm, PROMPT) == []  # nothing before planting
    planted = _plant(lm, ids)
    snapshot = weights_snapshot(lm.model)
    found = moe.detect_expert_super_weights(lm, PROMPT)
    assert_bit_identical(lm.model, snapshot)  # iterate-and-zero restored everything
    assert _coords(found) == planted
    for w in found:
        assert w["iteration"] == 0 and w["co_occurs"] and w["input_token"] == w["output_token"] == 0
        assert w["explained_share"] > 0.95
        assert w["input_value"] == pytest.approx(200.0, rel=0.01)
        assert w["output_value"] == pytest.approx(1200.0, rel=0.01)
        assert w["sink_routed"] and w["token_text"] == "The"
        assert isinstance(w["shared"], bool) and (w["expert"] is None) == w["shared"]


def test_further_rows_of_the_same_column_appear_in_later_iterations(tokenizer, ids):
    lm = make_tiny("mixtral", tokenizer)
    _plant(lm, ids, layer=1)
    arch.experts(lm.model, 1).down_proj.data[3, 20, 5] = 4.0  # a second, smaller row
    scan = moe.expert_super_weight_scan(lm, PROMPT)
    assert [(w["row"], w["iteration"]) for w in scan["super_weights"]] == [(7, 0), (20, 1)]
    assert scan["super_weights"][1]["output_value"] == pytest.approx(800.0, rel=0.01)
    assert [it["new"] for it in scan["iterations"]] == [[[1, 3, False, 7, 5]],
                                                        [[1, 3, False, 20, 5]], []]
    once = moe.expert_super_weight_scan(lm, PROMPT, max_iterations=1)
    assert [w["row"] for w in once["super_weights"]] == [7]


def test_co_spike_threshold_is_the_share_of_one_product(tokenizer, ids):
    lm = make_tiny("olmoe", tokenizer)
    for column in (5, 6):  # two spiking channels write row 7 equally: each explains half
        tiny_moe.plant_expert_super_weight(lm.model, 1, row=7, column=column, input_ids=ids,
                                           expert=3, value=3.0)
    strict = moe.expert_super_weight_scan(lm, PROMPT, co_spike_threshold=0.6)
    assert strict["super_weights"] == []
    (rejected,) = strict["rejected"]
    assert rejected["explained_share"] == pytest.approx(0.5, abs=0.01)
    assert "explains" in rejected["reasons"][0]
    loose = moe.detect_expert_super_weights(lm, PROMPT, co_spike_threshold=0.4)
    assert {(w["row"], w["column"]) for w in loose} <= {(7, 5), (7, 6)} and loose


def test_p_active_floor_spares_experts_the_sink_token_uses(tokenizer, ids):
    lm = make_tiny("qwen3_moe", tokenizer)
    _plant(lm, ids, layer=1)
    never_used = {layer: [0.0] * 8 for layer in arch.moe_layers(lm.model)}
    scan = moe.expert_super_weight_scan(lm, PROMPT, p_active=never_used)
    assert _coords(scan["super_weights"]) == {(1, 3, False, 7, 5)}
    assert scan["super_weights"][0]["p_active"] == 0.0
    spike = {"shared": False, "sink_routed": False, "co_occurs": True, "explained_share": 1.0}
    assert _reasons(spike, 0.005, 0.01, 0.5) and not _reasons(spike, 0.02, 0.01, 0.5)
    assert not _reasons(dict(spike, sink_routed=True), 0.005, 0.01, 0.5)
    assert _reasons(dict(spike, co_occurs=False), 0.5, 0.01, 0.5)


def test_detection_runs_in_bfloat16_with_float32_statistics(tokenizer, ids):
    lm = make_tiny("qwen2_moe", tokenizer)
    planted = _plant(lm, ids)
    lm.model.to(torch.bfloat16)
    found = moe.detect_expert_super_weights(lm, PROMPT)
    assert _coords(found) == planted
    assert all(isinstance(w["output_value"], float) for w in found)


# --- super experts ---------------------------------------------------------------------------


@pytest.mark.parametrize("model_type", ["qwen2_moe", "deepseek_v3"])
def test_planted_super_expert_is_flagged_over_texts(model_type, tokenizer, ids):
    lm = make_tiny(model_type, tokenizer)
    layer = arch.moe_layers(lm.model)[0]
    tiny_moe.plant_expert_super_weight(lm.model, layer, row=7, column=5, input_ids=ids, expert=3)
    texts = [p for p in moe.wikitext_paragraphs() if p.startswith("The ")]
    routing, maxima, info = moe.route_texts(lm, 6, 32, batch_size=3, texts=texts)
    assert info == {"source": "given texts", "count": 6, "tokens_per_text": 32, "tokens": 192}
    records = maxima.to_list()
    moe_layers = len(arch.moe_layers(lm.model))
    assert len(records) == moe_layers * (8 + (model_type in WITH_SHARED))
    assert sum(r["tokens"] for r in records if not r["shared"]) == moe_layers * 2 * 6 * 32
    rule = moe.flag_super_experts(records, arch.num_layers(lm.model))
    assert rule["layer_limit"] == 3 and rule["population"]["layers"] == \
        [layer for layer in arch.moe_layers(lm.model) if layer < 3]
    (flagged,) = rule["flagged"]
    assert (flagged["layer"], flagged["expert"], flagged["shared"]) == (layer, 3, False)
    assert flagged["output_channel"] == 7 and flagged["input_channel"] == 5
    assert flagged["output_position"] == 0 and flagged["output_text"] in range(6)
    assert flagged["max_output"] == pytest.approx(1200, rel=0.01)
    assert routing.layers[layer]["sink_count"][3] == 6  # every text's first token goes to it


# --- zero / skip / restore on the 3-D expert tensors ---------------------------------------


def test_expert_weight_edits_restore_bit_exactly(tokenizer):
    lm = make_tiny("qwen2_moe", tokenizer)
    model = lm.model
    snapshot = weights_snapshot(model)
    down = arch.experts(model, 1).down_proj
    edits = [ablate.WeightEdit(1, 7, 5, expert=3), ablate.WeightEdit(1, 8, 6, expert=3),
             ablate.WeightEdit(2, 11, 9, shared=True)]
    with ablate.edited(model, edits):
        assert down[3, 7, 5] == 0 and down[3, 8, 6] == 0
        assert arch.shared_expert(model, 2).down_proj.weight[11, 9] == 0
        changed = {k for k, v in model.state_dict().items() if not torch.equal(v, snapshot[k])}
        assert changed == {"model.layers.1.mlp.experts.down_proj",
                           "model.layers.2.mlp.shared_expert.down_proj.weight"}
        diff = (down != snapshot["model.layers.1.mlp.experts.down_proj"]).nonzero().tolist()
        assert diff == [[3, 7, 5], [3, 8, 6]]
    assert_bit_identical(model, snapshot)
    with pytest.raises(RuntimeError, match="boom"):
        with ablate.zeroed(model, [{"layer": 1, "row": 7, "column": 5, "expert": 3,
                                    "shared": False}]):
            raise RuntimeError("boom")
    assert_bit_identical(model, snapshot)


def test_skipping_experts_restores_bit_exactly_in_bfloat16(tokenizer):
    lm = make_tiny("deepseek_v3", tokenizer)
    model = lm.model.to(torch.bfloat16)
    snapshot = weights_snapshot(model)
    skip = [{"layer": 1, "expert": 3, "shared": False}, {"layer": 2, "expert": 0, "shared": False},
            {"layer": 2, "expert": None, "shared": True}]
    with pytest.raises(RuntimeError, match="boom"):
        with ablate.experts_skipped(model, skip):
            assert not arch.experts(model, 1).down_proj[3].any()
            assert arch.experts(model, 1).down_proj[2].any()
            assert not arch.shared_expert(model, 2).down_proj.weight.any()
            raise RuntimeError("boom")
    assert_bit_identical(model, snapshot)
    with ablate.experts_skipped(model, [(3, 7)]):
        assert not arch.experts(model, 3).down_proj[7].any()
    assert_bit_identical(model, snapshot)


def test_dense_model_is_reported_not_routed(tokenizer, tmp_path):
    lm = make_tiny("llama", tokenizer)
    result = moe.moe_analysis(lm, moe.MoESettings(router_analysis_samples=2))
    assert result["is_moe"] is False and result["routing"] == []
    assert result["schema"] == "sw-moe/2" and result["skip_evaluation"] is None
    with pytest.raises(ValueError, match="no mixture-of-experts layers"):
        moe.detect_expert_super_weights(lm, PROMPT)
    moe_plots.moe_analysis_figure(result, tmp_path / "moe_analysis.png")
    assert (tmp_path / "moe_analysis.png").stat().st_size > 1000
    moe_plots.skip_figure(result, tmp_path / "skipped.png")
    assert (tmp_path / "skipped.png").stat().st_size > 1000


def test_dense_detector_takes_in_expert_super_weights(tokenizer, ids):
    """DeepSeek: the dense first layer is the dense detector's, the MoE layers this module's;
    both land in one candidate list and are confirmed through the same ablation path."""
    lm = make_tiny("deepseek_v3", tokenizer)
    tiny.plant_super_weight(lm.model, 0, row=3, column=4, input_ids=ids)
    planted = _plant(lm, ids) | {(0, None, False, 3, 4)}
    snapshot = weights_snapshot(lm.model)
    found = detect.detect_super_weights(lm, PROMPT, reference_tokens=32, progress=False)
    assert _coords(found.candidates) == planted
    assert all(c["verdict"] in ("super_weight", "contributor", "no_effect")
               for c in found.candidates)
    assert_bit_identical(lm.model, snapshot)
    # each candidate's perplexity ratio is its own ablation's, recomputed here by brute force
    ref = reference.reference_text(tokenizer, 32).ids
    baseline = reference.mean_loss(lm.model, ref)
    for c in found.candidates:
        with ablate.zeroed(lm.model, [c]):
            ratio = math.exp(reference.mean_loss(lm.model, ref) - baseline)
        assert c["perplexity_ratio"] == pytest.approx(ratio, rel=1e-4), _coords([c])
