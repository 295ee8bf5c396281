"""The table of stages: one entry per analysis notebook, read by everything that needs it.

Each `Stage` says which notebook runs, which models it applies to (every model, MoE models
only, or once for the whole run), which stages' files it reads, and the files it writes. The
pipeline runs the table in order, the results layout turns the declared files into paths,
resume clears a stage's files before rerunning it and checks they are back, and the report
index lists pages in this order. Adding a stage takes one entry here (and its notebook).

File names: `data` files are `data/<name>_<ts>.json`, `plot` files `plots/<name>_<ts>.png` in
the model's folder (a whole-run stage's plots go to `summary_plots/`); `{i}` in a name stands
for an index, one file per index, zero or more of them.
"""
from __future__ import annotations

from dataclasses import dataclass

EVERY_MODEL, MOE_ONLY, WHOLE_RUN = "every model", "MoE only", "whole run"


@dataclass(frozen=True)
class Output:
    kind: str  # "data" (JSON) or "plot" (PNG)
    name: str  # file name before _<ts>; "{i}" marks one file per index
    required: bool = True  # the stage failed if it finished without this file

    @property
    def many(self) -> bool:
        return "{i}" in self.name


def data(name: str, required: bool = True) -> Output:
    return Output("data", name, required and "{i}" not in name)


def plot(name: str, required: bool = True) -> Output:
    return Output("plot", name, required)


@dataclass(frozen=True)
class Stage:
    name: str  # also the notebook's file name without .ipynb
    applies_to: str  # EVERY_MODEL, MOE_ONLY or WHOLE_RUN
    depends_on: tuple[str, ...] = ()  # stages whose files it reads (same model)
    writes: tuple[Output, ...] = ()

    @property
    def notebook(self) -> str:
        return f"{self.name}.ipynb"

    def applies(self, is_moe: bool | None) -> bool:
        """Whether this per-model stage runs for a model."""
        return self.applies_to == EVERY_MODEL or (self.applies_to == MOE_ONLY and bool(is_moe))


STAGES: tuple[Stage, ...] = (
    Stage("01_detection", EVERY_MODEL, (),
          (data("detection"), plot("detection_iterations"), plot("super_weight_distribution"))),
    Stage("02_individual_ablation", EVERY_MODEL, ("01_detection",),
          (data("individual_analyses/sw_{i}_analysis"), data("individual_summary"),
           plot("impact_comparison"))),
    Stage("03_combined_ablation", EVERY_MODEL, ("01_detection",),
          (data("combined_analysis"), plot("combined_analysis"))),
    Stage("04_moe_routing", MOE_ONLY, (),
          (data("moe_analysis"), plot("moe_analysis"), plot("super_experts_skipped"))),
    Stage("05_cross_model_comparison", WHOLE_RUN, (), (plot("model_comparison"),)),
    # Per model, after 01 (they run before the whole-run comparison, which reads their JSON).
    Stage("06_mechanisms", EVERY_MODEL, ("01_detection",),
          (data("mechanisms"), plot("super_activation_trace"),
           plot("scaling_curve", required=False), plot("stop_words", required=False))),
    Stage("07_quantization", EVERY_MODEL, ("01_detection",),
          (data("quantization"), plot("weight_quantization", required=False))),
)

BY_NAME = {s.name: s for s in STAGES}
MODEL_STAGES = tuple(s.name for s in STAGES if s.applies_to != WHOLE_RUN)
RUN_STAGES = tuple(s.name for s in STAGES if s.applies_to == WHOLE_RUN)


def stage(name: str) -> Stage:
    try:
        return BY_NAME[name]
    except KeyError:
        raise KeyError(f"unknown stage '{name}'; stages: {', '.join(BY_NAME)}") from None


def order(name: str) -> int:
    """Position of a stage in the table (unknown names last), for sorting pages."""
    return list(BY_NAME).index(name) if name in BY_NAME else len(BY_NAME)
