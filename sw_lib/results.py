"""The results tree of a run: folder layout, one timestamp, atomic JSON, schema validation.

```
<results_dir>/
  complete_analysis_<ts>.json            every model's status + cross-model comparison
  summary_plots/model_comparison_<ts>.png
  notebooks/05_cross_model_comparison_<ts>.ipynb   reports/05_cross_model_comparison_<ts>.html
  logs/run_<ts>.log                      the run's own log (claims the timestamp)
  <model slug>/
    data/detection_<ts>.json  data/analysis_<ts>.json  data/combined_analysis_<ts>.json
    data/individual_analyses/sw_<i>_analysis_<ts>.json  data/moe_analysis_<ts>.json
    plots/<figure>_<ts>.png  logs/analysis_<ts>.log  notebooks/<stage>_<ts>.ipynb
    reports/<stage>_<ts>.html
```

Every file a run writes carries its timestamp, so runs in one folder never overwrite each
other; which files each stage writes is declared in `sw_lib.stages`. `analysis_<ts>.json`
assembles a model's stage outputs with the configuration used, package versions and a status
per stage; `sw_lib/schema/analysis.schema.json` validates it and `complete_analysis_<ts>.json`.
"""
from __future__ import annotations

import json
import math
import os
import platform
import re
import tempfile
import time
from dataclasses import dataclass
from datetime import datetime
from functools import lru_cache
from importlib import metadata, resources
from pathlib import Path

from . import stages as stage_table
from .stages import MODEL_STAGES, Output

ANALYSIS_SCHEMA = "sw-analysis/1"
COMPLETE_SCHEMA = "sw-complete/1"
TIMESTAMP_FORMAT = "%Y%m%d_%H%M%S"
_TS = re.compile(r"_(\d{8}_\d{6})\.(json|log|ipynb|html|png)$")

COMPARISON_STAGE = stage_table.RUN_STAGES[0]


# --- timestamps and names ----------------------------------------------------------------------


def new_timestamp(results_dir: str | Path | None = None) -> str:
    """Now as YYYYMMDD_HHMMSS; with `results_dir`, one that no run there has used yet (waits
    for the next second when a run of this second exists), so runs never share files."""
    used = set(run_timestamps(results_dir)) if results_dir is not None else set()
    while (ts := datetime.now().strftime(TIMESTAMP_FORMAT)) in used:
        time.sleep(0.05)
    return ts


def is_timestamp(text: str) -> bool:
    try:
        datetime.strptime(text, TIMESTAMP_FORMAT)
    except (TypeError, ValueError):
        return False
    return len(text) == 15


def run_timestamps(results_dir: str | Path) -> list[str]:
    """Every run timestamp found in the file names under `results_dir`, oldest first."""
    root = Path(results_dir)
    if not root.is_dir():
        return []
    return sorted({m.group(1) for p in root.rglob("*_*.*") if (m := _TS.search(p.name))})


def latest_timestamp(results_dir: str | Path) -> str | None:
    """The newest run timestamp among the files under `results_dir` (for --resume)."""
    found = run_timestamps(results_dir)
    return found[-1] if found else None


def slug(spec: str) -> str:
    """A folder name for a model spec, the same rule as `LoadedModel.slug`.

    Paths (folders, .gguf files) use their last component, hub ids keep org and name.
    """
    looks_like_path = (spec.endswith(".gguf") or spec.startswith((".", "/", "~"))
                       or Path(os.path.expanduser(spec)).exists())
    base = Path(spec.rstrip("/")).name if looks_like_path else spec
    base = base.removesuffix(".gguf")
    return "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in base) or "model"


def unique_slugs(specs: list[str]) -> list[str]:
    """Slugs for a list of models; repeats get -2, -3, ... so folders never collide."""
    seen: dict[str, int] = {}
    out = []
    for spec in specs:
        base = slug(spec)
        seen[base] = seen.get(base, 0) + 1
        out.append(base if seen[base] == 1 else f"{base}-{seen[base]}")
    return out


def default_results_dir() -> Path:
    """Where `make analyze` puts results: params/default.yaml's `results_dir`, taken from this
    project's checkout (the folder make runs in) when sw_lib runs from one, else from the
    current folder. Notebooks opened in JupyterLab (which run in notebooks/) use it too."""
    from . import config

    folder = Path(config.defaults()["results_dir"]).expanduser()
    if folder.is_absolute():
        return folder
    root = Path(__file__).resolve().parents[1]
    return (root if (root / "pyproject.toml").is_file() else Path.cwd()) / folder


def model_output_dir(model: str, output_dir: str | Path | None = None) -> Path:
    """A notebook's `output_dir`, or when it is empty the model's folder where the batch run
    puts it: `<default_results_dir()>/<slug(model)>`."""
    return Path(output_dir) if output_dir else default_results_dir() / slug(model)


# --- layout --------------------------------------------------------------------------------------


class _StageFiles:
    """The files a stage declares (sw_lib.stages), as paths of one run."""

    root: Path
    ts: str

    def output(self, out: Output, index: int | str = "{i}") -> Path:
        name = out.name.replace("{i}", str(index))
        return self.data(name) if out.kind == "data" else self.plot(name)

    def stage_files(self, stage: str) -> list[Path]:
        """Every file of `stage` in this run that exists now (indexed files included)."""
        found = []
        for out in stage_table.stage(stage).writes:
            if out.many:
                pattern = self.output(out, "*")
                found += sorted(pattern.parent.glob(pattern.name))
            elif self.output(out).is_file():
                found.append(self.output(out))
        return found

    def missing(self, stage: str) -> list[Path]:
        """The required files of `stage` that are not there."""
        return [self.output(o) for o in stage_table.stage(stage).writes
                if o.required and not self.output(o).is_file()]

    def clear(self, stage: str) -> list[Path]:
        """Delete this run's files of `stage` (before it runs again, so it never reads what
        an earlier attempt of itself left); returns what was deleted."""
        removed = self.stage_files(stage)
        for path in removed:
            path.unlink(missing_ok=True)
        return removed


@dataclass(frozen=True)
class ModelPaths(_StageFiles):
    """Where one model's files of one run live (`root` is the model's result folder)."""

    root: Path
    ts: str

    @property
    def data_dir(self) -> Path:
        return self.root / "data"

    @property
    def plots_dir(self) -> Path:
        return self.root / "plots"

    @property
    def logs(self) -> Path:
        return self.root / "logs"

    @property
    def notebooks(self) -> Path:
        return self.root / "notebooks"

    @property
    def reports(self) -> Path:
        return self.root / "reports"

    def data(self, name: str) -> Path:
        """`data/<name>_<ts>.json` (name may hold a subfolder)."""
        return self.data_dir / f"{name}_{self.ts}.json"

    def plot(self, name: str) -> Path:
        """`plots/<name>_<ts>.png`."""
        return self.plots_dir / f"{name}_{self.ts}.png"

    @property
    def individual_dir(self) -> Path:
        return self.data_dir / "individual_analyses"

    @property
    def detection_json(self) -> Path:
        return self.data("detection")

    @property
    def individual_summary_json(self) -> Path:
        return self.data("individual_summary")

    @property
    def combined_json(self) -> Path:
        return self.data("combined_analysis")

    @property
    def moe_json(self) -> Path:
        return self.data("moe_analysis")

    @property
    def analysis_json(self) -> Path:
        return self.data("analysis")

    @property
    def log_file(self) -> Path:
        return self.logs / f"analysis_{self.ts}.log"

    def individual_json(self, index: int) -> Path:
        return self.data(f"individual_analyses/sw_{index}_analysis")

    def individual_jsons(self) -> list[Path]:
        """This run's individual analyses, in index order."""
        pattern = re.compile(rf"sw_(\d+)_analysis_{self.ts}\.json$")
        found = [(int(m.group(1)), p) for p in self.individual_dir.glob(f"sw_*_{self.ts}.json")
                 if (m := pattern.match(p.name))]
        return [p for _, p in sorted(found)]

    def notebook(self, stage: str) -> Path:
        return self.notebooks / f"{stage}_{self.ts}.ipynb"

    def report(self, stage: str) -> Path:
        return self.reports / f"{stage}_{self.ts}.html"

    def make(self) -> "ModelPaths":
        for folder in (self.data_dir, self.plots_dir, self.logs, self.notebooks, self.reports):
            folder.mkdir(parents=True, exist_ok=True)
        return self


@dataclass(frozen=True)
class RunPaths(_StageFiles):
    """The run-level files of one run under `results_dir`."""

    results_dir: Path
    ts: str

    @property
    def root(self) -> Path:
        return self.results_dir

    def data(self, name: str) -> Path:
        return self.results_dir / f"{name}_{self.ts}.json"

    def plot(self, name: str) -> Path:
        return self.summary_plots / f"{name}_{self.ts}.png"

    @property
    def complete_json(self) -> Path:
        return self.data("complete_analysis")

    @property
    def summary_plots(self) -> Path:
        return self.results_dir / "summary_plots"

    @property
    def comparison_png(self) -> Path:
        return self.plot("model_comparison")

    @property
    def log_file(self) -> Path:
        return self.results_dir / "logs" / f"run_{self.ts}.log"

    def model(self, slug_: str) -> ModelPaths:
        return ModelPaths(self.results_dir / slug_, self.ts)

    def notebook(self, stage: str = COMPARISON_STAGE) -> Path:
        return self.results_dir / "notebooks" / f"{stage}_{self.ts}.ipynb"

    def report(self, stage: str = COMPARISON_STAGE) -> Path:
        return self.results_dir / "reports" / f"{stage}_{self.ts}.html"


# --- JSON --------------------------------------------------------------------------------------


def jsonable(obj):
    """Plain JSON values: non-finite floats become None, numpy scalars Python numbers,
    paths strings, objects with to_dict() their dicts."""
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    if hasattr(obj, "to_dict"):
        return jsonable(obj.to_dict())
    if hasattr(obj, "tolist") and hasattr(obj, "ndim"):
        return jsonable(obj.tolist())  # numpy / torch scalars and arrays
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    return obj


def write_json(path: str | Path, data) -> Path:
    """Write `data` as JSON atomically: a temporary file in the same folder, then os.replace,
    so a reader (or a resumed run) never sees half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(jsonable(data), f, indent=2, allow_nan=False)
            f.write("\n")
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; results are meant to be shared
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def read_json(path: str | Path):
    with open(path) as f:
        return json.load(f)


def read_json_if_exists(path: str | Path):
    """The parsed file, or None when it is missing or not valid JSON (an interrupted writer
    of another program); never raises for those two cases."""
    try:
        return read_json(path)
    except (FileNotFoundError, json.JSONDecodeError):
        return None


# --- provenance --------------------------------------------------------------------------------


def package_versions() -> dict[str, str | None]:
    """Versions of the packages that shape the numbers."""
    out: dict[str, str | None] = {"python": platform.python_version()}
    for name in ("sw-lib", "torch", "transformers", "numpy", "gguf", "papermill", "nbconvert"):
        try:
            out[name.replace("-", "_")] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name.replace("-", "_")] = None
    return out


def stage_record(status: str, error: str | None = None, seconds: float | None = None,
                 **extra) -> dict:
    """A stage's status: ok | failed | skipped, with the error (one line) and seconds."""
    if status not in ("ok", "failed", "skipped"):
        raise ValueError(f"stage status must be ok, failed or skipped, not {status!r}")
    return {"status": status, "error": error, "seconds": seconds, **extra}


def overall_status(stages: dict[str, dict]) -> str:
    return "failed" if any(s["status"] == "failed" for s in stages.values()) else "ok"


def assemble_analysis(paths: ModelPaths, *, model: str, family: str | None,
                      is_moe: bool | None, config: dict, stages: dict[str, dict],
                      versions: dict | None = None) -> dict:
    """`analysis_<ts>.json`: the stage outputs found on disk + configuration + stage status."""
    individual = [read_json_if_exists(p) for p in paths.individual_jsons()]
    detection = read_json_if_exists(paths.detection_json)
    return {
        "schema_version": ANALYSIS_SCHEMA,
        "run_timestamp": paths.ts,
        "model": model,
        "slug": paths.root.name,
        "family": family,
        "is_moe": is_moe,
        "num_layers": detection.get("num_layers") if isinstance(detection, dict) else None,
        "status": overall_status(stages),
        "updated": datetime.now().isoformat(timespec="seconds"),
        "config": config,
        # dtype and device as the notebooks resolved "auto" (from the detection's own record)
        "resolved_runtime": _resolved_runtime(detection),
        "versions": versions or package_versions(),
        "stages": stages,
        "detection": detection,
        "individual": [a for a in individual if a is not None] if individual else None,
        "combined": read_json_if_exists(paths.combined_json),
        "moe": read_json_if_exists(paths.moe_json),
        "mechanisms": read_json_if_exists(paths.data("mechanisms")),
        "quantization": read_json_if_exists(paths.data("quantization")),
        "peak_memory": peak_memory(stages),
    }


def peak_memory(stages: dict[str, dict]) -> dict | None:
    """The largest resident memory of any stage's kernel (MiB) and which stage it was."""
    peaks = [(s["peak_memory_mib"], name) for name, s in stages.items()
             if s.get("peak_memory_mib")]
    if not peaks:
        return None
    mib, stage = max(peaks)
    return {"mib": mib, "stage": stage}


def _resolved_runtime(detection) -> dict | None:
    used = detection.get("config") if isinstance(detection, dict) else None
    if not isinstance(used, dict):
        return None
    return {"dtype": used.get("dtype"), "device": used.get("device")}


def model_entry(analysis: dict, results_dir: Path) -> dict:
    """A model's line in the complete JSON: who, status, first error, where its files are."""
    ts, slug_ = analysis["run_timestamp"], analysis["slug"]
    paths = ModelPaths(results_dir / slug_, ts)
    failed = [(name, s) for name, s in analysis["stages"].items() if s["status"] == "failed"]
    pages = sorted(paths.reports.glob(f"*_{ts}.html"),
                   key=lambda p: (stage_table.order(p.name[:-len(f"_{ts}.html")]), p.name))
    reports = [str(p.relative_to(results_dir)) for p in pages]
    return {"model": analysis["model"], "slug": slug_, "family": analysis.get("family"),
            "is_moe": analysis.get("is_moe"), "status": analysis["status"],
            "error": f"{failed[0][0]}: {failed[0][1]['error']}" if failed else None,
            "analysis": str(paths.analysis_json.relative_to(results_dir)),
            "reports": reports, "stages": analysis["stages"]}


def assemble_complete(run: RunPaths, slugs: list[str], config: dict, *,
                      stages: dict[str, dict] | None = None, comparison: dict | None = None,
                      reports_index: str | None = None, versions: dict | None = None) -> dict:
    """`complete_analysis_<ts>.json` from the models' analysis files on disk."""
    models = []
    for slug_ in slugs:
        analysis = read_json_if_exists(run.model(slug_).analysis_json)
        if analysis is not None:
            models.append(model_entry(analysis, run.results_dir))
    stages = stages or {}
    status = "failed" if (any(m["status"] == "failed" for m in models)
                          or len(models) < len(slugs) or overall_status(stages) == "failed") else "ok"
    plot = run.comparison_png
    return {
        "schema_version": COMPLETE_SCHEMA,
        "run_timestamp": run.ts,
        "results_dir": str(run.results_dir),
        "status": status,
        "updated": datetime.now().isoformat(timespec="seconds"),
        "config": config,
        "versions": versions or package_versions(),
        "models": models,
        "stages": stages,
        "comparison": comparison,
        "files": {"comparison_plot": str(plot.relative_to(run.results_dir)) if plot.is_file() else None,
                  "reports_index": reports_index},
    }


# --- schema --------------------------------------------------------------------------------------


@lru_cache(maxsize=1)
def schema() -> dict:
    text = (resources.files("sw_lib") / "schema" / "analysis.schema.json").read_text()
    return json.loads(text)


def validation_errors(document: dict) -> list[str]:
    """Every way `document` (analysis or complete JSON) breaks the schema, one line each."""
    import jsonschema

    validator = jsonschema.Draft202012Validator(schema())
    errors = sorted(validator.iter_errors(document), key=lambda e: list(e.absolute_path))
    lines = [f"{'/'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}" for e in errors]
    if document.get("schema_version") == ANALYSIS_SCHEMA and isinstance(document.get("stages"), dict):
        # every stage of the table has a record (run, skipped or failed)
        lines += [f"stages: '{name}' is a required property" for name in ("resolve", *MODEL_STAGES)
                  if name not in document["stages"]]
    return lines


def validate(document: dict) -> None:
    """Raise ValueError naming the first problems when `document` breaks the schema."""
    errors = validation_errors(document)
    if errors:
        raise ValueError(f"{len(errors)} schema error(s): " + "; ".join(errors[:3]))
