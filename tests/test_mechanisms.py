"""Notebook 06/07 arithmetic: recovery of the restore, the quantization claim read off the grid,
and the restore edits built from a trace."""
from __future__ import annotations

import math

import pytest

from sw_lib import mechanisms, quantization, trace

import tiny
from conftest import make_tiny


def test_recovery_is_the_share_of_the_damage_undone():
    summaries = {"original": {"perplexity": 10.0, "accuracy": {"mmlu": 0.6, "arc_easy": 0.5}},
                 "zeroed": {"perplexity": 1000.0, "accuracy": {"mmlu": 0.2, "arc_easy": 0.5}},
                 "restored": {"perplexity": 100.0, "accuracy": {"mmlu": 0.5, "arc_easy": 0.4}}}
    rec = mechanisms.recovery(summaries)
    assert rec["perplexity"] == pytest.approx(0.5)  # ln 1000 -> ln 100 of ln 1000 -> ln 10
    assert rec["accuracy"]["mmlu"] == pytest.approx(0.75)
    assert rec["accuracy"]["arc_easy"] is None  # zeroing changed nothing
    summaries["zeroed"]["perplexity"] = math.inf
    assert mechanisms.recovery(summaries)["perplexity"] is None


def test_claim_reads_the_largest_block_each_variant_keeps_quality():
    ratios = {(64, "naive"): 1.10, (64, "super_weight_aware"): 1.08,
              (512, "naive"): 1.50, (512, "super_weight_aware"): 1.09,
              ("tensor", "naive"): 9.0, ("tensor", "super_weight_aware"): 3.0}
    points = [{"bits": 4, "block_size": s, "variant": v, "perplexity_ratio": r}
              for (s, v), r in ratios.items()]
    c = quantization.claim(points, [4], [64, 512, "tensor"])["4"]
    assert c["naive_ratio_at_smallest_block"] == 1.10
    assert c["largest_block_as_good"] == {"naive": 64, "super_weight_aware": 512}
    assert c["gap_at_largest_block"] == pytest.approx(3.0)


def test_restore_edits_hold_the_original_values_and_the_massive_threshold(tokenizer):
    lm = make_tiny("llama", tokenizer)
    ids = tokenizer("Apple Inc. is a worldwide tech company.", return_tensors="pt").input_ids
    tiny.plant_super_weight(lm.model, 1, 5, 7, ids, value=6.0, extra_rows={9: -4.0})
    weights = [{"layer": 1, "row": 5, "column": 7}, {"layer": 1, "row": 9, "column": 7}]
    doc = trace.super_activation_trace(lm, "Apple Inc. is a worldwide tech company.", weights)
    restores, skipped = mechanisms.restore_edits(lm.model, weights, doc)
    assert skipped == []
    by_row = {r.row: r for r in restores}
    assert by_row[5].values == (6.0,) and by_row[9].values == (-4.0,)
    outputs = {w["row"]: abs(w["down_proj_output"]) for a in doc["activations"]
               for w in a["super_weights"]}
    assert by_row[5].min_value == pytest.approx(trace.MASSIVE_FRACTION * outputs[5])


def test_flags_and_rules_of_the_06_07_parameters():
    from sw_lib import cli, config

    args = cli.build_parser().parse_args(
        ["--restore-tasks", "--scaling-factors", "0", "1", "2", "--block-sizes", "64", "tensor",
         "--weight-bits", "4", "3", "--no-quantization"])
    cfg = cli.load_config(args)
    mech, quant = cfg["mechanisms"], cfg["quantization"]
    assert mech["restore_tasks"] == [] and mech["scaling_factors"] == [0.0, 1.0, 2.0]
    assert quant["block_sizes"] == [64, "tensor"] and quant["weight_bits"] == [4, 3]
    assert quant["run_quantization"] is False
    assert config.load()["mechanisms"]["restore_tasks"] is None  # null: evaluation's tasks
    for flags, message in ((["--block-sizes", "1"], "--block-sizes: must be a list of block sizes"),
                           (["--weight-bits", "9"], "--weight-bits: must be a list of bit widths"),
                           (["--clip-z", "0"], "--clip-z: must be a number > 0")):
        with pytest.raises(config.ConfigError, match=message):
            cli.load_config(cli.build_parser().parse_args(flags))
