"""Quantization with and without handling the super weight (notebook 07).

- **Weights**: every linear layer of the decoder, round-to-nearest asymmetric INT`bits` in
  blocks (`edits.WeightQuantization`, the quantizer in `sw_lib.quantize`), for each bit width
  and block size: naive, and super-weight-aware as in the paper (each block's outliers clipped
  at mean |w| + clip_z * std |w| before quantizing, the super weights kept in full
  precision). The paper's claim: handling the super weight lets much larger blocks keep
  quality. `claim` reads it off the grid: per bit width, the naive perplexity ratio at the
  smallest block, and the largest block at which each variant still does as well.
- **Activations**: the inputs of every dense down projection, per-sequence round-to-nearest
  INT`bits` (`edits.ActivationQuantization`): naive, and holding the super activation out
  (the largest input of each super weight's column stays unquantized).

Each configuration is one edit, a distinct cached condition evaluated against the unedited
model on the same windows (`sw_lib.study`: perplexity ratio with its paired bootstrap
interval). `quantization_document` assembles `data/quantization_<ts>.json` (sw-quantization/1).
"""
from __future__ import annotations

from typing import Sequence

from tqdm.auto import tqdm

from . import study
from .edits import ActivationQuantization, WeightQuantization

SCHEMA = "sw-quantization/1"
VARIANTS = ("naive", "super_weight_aware")


def _point(baseline: study.Condition, condition: study.Condition, **fields) -> dict:
    impact = study.compare(baseline, condition)
    ppl = impact["perplexity_impact"] or {}
    return {**fields, "perplexity": study.summarize(condition)["perplexity"],
            "perplexity_ratio": ppl.get("perplexity_ratio"), "ratio_ci95": ppl.get("ratio_ci95"),
            "finite": ppl.get("modified_perplexity_finite"), "significant": ppl.get("significant"),
            "accuracy": study.summarize(condition)["accuracy"],
            "accuracy_impacts": impact["accuracy_impacts"], "seconds": condition.seconds}


def weight_quantization(lm, super_weights: Sequence[dict], bits: Sequence[int],
                        block_sizes: Sequence[int | str], clip_z: float,
                        settings: study.StudySettings, cache=None,
                        baseline: study.Condition | None = None) -> dict:
    """The grid bits x block sizes x {naive, super-weight-aware}, each against the baseline."""
    baseline = baseline or study.evaluate_condition(lm, [], settings, cache)
    grid = [(b, size, variant) for b in bits for size in block_sizes for variant in VARIANTS]
    points = []
    for b, size, variant in tqdm(grid, desc="weight quantization", unit="condition",
                                 disable=not settings.progress):
        edit = (WeightQuantization.naive(b, size) if variant == "naive" else
                WeightQuantization.super_weight_aware(b, size, clip_z, super_weights))
        condition = study.evaluate_against(lm, baseline, [edit], settings, cache)
        points.append(_point(baseline, condition, bits=b, block_size=size, variant=variant,
                             edit=edit.to_dict()))
    return {"bits": list(bits), "block_sizes": list(block_sizes), "clip_z": clip_z,
            "super_weights_kept": len(super_weights), "points": points,
            "claim": claim(points, bits, block_sizes)}


def claim(points: list[dict], bits: Sequence[int], block_sizes: Sequence[int | str]) -> dict:
    """Per bit width: the naive ratio at the smallest block, the largest block at which each
    variant is at least as good (None: none), and the gap at the largest block (naive ratio /
    aware ratio; above 1: handling the super weight helps there)."""
    def ratio(b, size, variant):
        return next((p["perplexity_ratio"] for p in points if p["bits"] == b
                     and p["block_size"] == size and p["variant"] == variant), None)

    out = {}
    for b in bits:
        reference = ratio(b, block_sizes[0], "naive")
        keeps = {}
        for variant in VARIANTS:
            ok = [size for size in block_sizes if reference is not None
                  and ratio(b, size, variant) is not None and ratio(b, size, variant) <= reference]
            keeps[variant] = ok[-1] if ok else None
        naive, aware = ratio(b, block_sizes[-1], "naive"), ratio(b, block_sizes[-1],
                                                                  "super_weight_aware")
        out[str(b)] = {"naive_ratio_at_smallest_block": reference,
                       "largest_block_as_good": keeps, "largest_block": block_sizes[-1],
                       "naive_ratio_at_largest_block": naive,
                       "aware_ratio_at_largest_block": aware,
                       "gap_at_largest_block": (naive / aware if naive is not None and aware
                                                else None)}
    return out


def activation_quantization(lm, super_weights: Sequence[dict], bits: int,
                            settings: study.StudySettings, cache=None,
                            baseline: study.Condition | None = None) -> dict:
    """Naive per-sequence INT`bits` of the down projections' inputs, and holding the super
    activations out (only with dense super weights)."""
    baseline = baseline or study.evaluate_condition(lm, [], settings, cache)
    hold = tuple(sorted({(int(w["layer"]), int(w["column"])) for w in super_weights
                         if w.get("expert") is None and not w.get("shared", False)}))
    edits = [ActivationQuantization(bits)] + ([ActivationQuantization(bits, hold)] if hold else [])
    points = [_point(baseline, study.evaluate_against(lm, baseline, [e], settings, cache),
                     bits=bits, variant=e.variant, edit=e.to_dict()) for e in edits]
    return {"bits": bits, "hold_out": [{"layer": layer, "column": column} for layer, column in hold],
            "points": points,
            "note": None if hold else "no dense super weight: nothing to hold out"}


def weight_rows(weights: dict) -> list[dict]:
    """One row per (bits, block size): perplexity ratio of each variant and their gap."""
    rows = {}
    for p in weights["points"]:
        row = rows.setdefault((p["bits"], str(p["block_size"])),
                              {"bits": p["bits"], "block size": p["block_size"]})
        row[f"{p['variant']} perplexity"] = p["perplexity"]
        row[f"{p['variant']} ratio"] = p["perplexity_ratio"]
    for row in rows.values():
        naive, aware = row.get("naive ratio"), row.get("super_weight_aware ratio")
        row["naive / aware"] = naive / aware if naive is not None and aware else None
    return list(rows.values())


def activation_rows(activations: dict) -> list[dict]:
    return [{"bits": p["bits"], "variant": p["variant"], "perplexity": p["perplexity"],
             "ratio": p["perplexity_ratio"], "ratio 95% CI": p["ratio_ci95"]}
            for p in activations["points"]]


def quantization_document(*, model: str, fingerprint: str | None, run_timestamp: str,
                          detection_json, selection: dict, settings: dict,
                          baseline: study.Condition, weights: dict, activations: dict,
                          timing: dict) -> dict:
    """`data/quantization_<ts>.json`."""
    return {"schema": SCHEMA, "model": model, "fingerprint": fingerprint,
            "run_timestamp": run_timestamp,
            "detection_json": None if detection_json is None else str(detection_json),
            "settings": settings, "super_weights": selection["weights"],
            "ablation_selection": {k: v for k, v in selection.items() if k != "weights"},
            "baseline": None if baseline is None else study.summarize(baseline),
            "weights": weights,
            "activations": activations, "timing": timing}
