"""Published super weight coordinates, for regression checks on models that have them.

0-indexed Hugging Face layers; `model.layers[l].mlp.down_proj.weight[row, column]`.
Sources: Yu et al. 2024 (arXiv 2411.07191), Table 2 and activation traces (DESIGN.md §4).
Entries are matched by the last path component of the model name, case-insensitive.
"""
from __future__ import annotations

PUBLISHED: dict[str, dict] = {
    "llama-7b": {"source": "Yu et al. 2024", "weights": [(2, 3968, 7003)]},
    "llama-2-7b-hf": {"source": "Yu et al. 2024", "weights": [(1, 2533, 7890)]},
    "mistral-7b-v0.1": {"source": "Yu et al. 2024", "weights": [(1, 2070, 7310)]},
    "olmo-1b-0724-hf": {"source": "Yu et al. 2024 (L2 from activation traces)",
                        "weights": [(1, 1764, 1710), (2, 1764, 8041)]},
    "olmo-7b-0724-hf": {"source": "Yu et al. 2024",
                        "weights": [(1, 269, 7467), (2, 269, 8275), (7, 269, 453), (24, 269, 2300)]},
    "phi-3-mini-4k-instruct": {"source": "Yu et al. 2024",
                               "weights": [(2, 525, 808), (2, 1693, 808), (2, 1113, 808),
                                           (4, 525, 2723), (4, 1113, 2723), (4, 1693, 2723)]},
    "meta-llama-3-8b": {"source": "Yu et al. 2024",
                        "weights": [(1, 788, 2427), (1, 1384, 2427), (1, 4062, 2427)]},
}

# Hub ids whose last component differs from the key above.
ALIASES = {"huggyllama/llama-7b": "llama-7b"}


def lookup(model_name: str) -> dict | None:
    name = ALIASES.get(model_name, model_name).rstrip("/").split("/")[-1].lower()
    entry = PUBLISHED.get(name)
    return None if entry is None else {"model": name, **entry}


def compare(model_name: str, candidates: list[dict]) -> dict | None:
    """Which published weights were found among `candidates` (None: model not catalogued)."""
    entry = lookup(model_name)
    if entry is None:
        return None
    by_coord = {(c["layer"], c["row"], c["column"]): c for c in candidates}
    expected = [{"layer": layer, "row": r, "column": c} for layer, r, c in entry["weights"]]
    found = [dict(e, verdict=by_coord[(e["layer"], e["row"], e["column"])].get("verdict"))
             for e in expected if (e["layer"], e["row"], e["column"]) in by_coord]
    missing = [e for e in expected if (e["layer"], e["row"], e["column"]) not in by_coord]
    return {"model": entry["model"], "source": entry["source"], "expected": expected,
            "found": found, "missing": missing}
