"""The batch pipeline: run the analysis notebooks for every model with papermill, export HTML.

For each model: `01_detection` -> `02_individual_ablation` -> `03_combined_ablation`
(-> `04_moe_routing` for mixture-of-experts models), then `05_cross_model_comparison` over all
models. Each executed notebook is saved under `<model>/notebooks/` and exported to
`<model>/reports/*.html` (figures inline as base64 PNG). A notebook gets only the parameters its
`parameters` cell declares, so notebooks evolve independently of this module.

Robustness: a stage that fails is recorded (status, one-line error, seconds) and the run goes
on with the next model; stages that need a failed one are skipped. `analysis_<ts>.json` is
rewritten atomically after every stage, which is what `resume` reads: a stage is redone only
if its record is not ok, its parameters changed, one of its files is missing, or a stage it
depends on was redone.
"""
from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

from . import config as config_mod
from . import results
from .results import COMPARISON_STAGE, MODEL_STAGES, ModelPaths, RunPaths

log = logging.getLogger("sw_lib.pipeline")

DEPENDS_ON = {"02_individual_ablation": "01_detection", "03_combined_ablation": "01_detection"}
# The files a stage must leave behind (the notebook contract in docs/ARCHITECTURE.md).
REQUIRED_OUTPUTS = {
    "01_detection": lambda p: [p.detection_json],
    "02_individual_ablation": lambda p: [],  # sw_<i> files: one per super weight, maybe none
    "03_combined_ablation": lambda p: [p.combined_json],
    "04_moe_routing": lambda p: [p.moe_json],
}
_SKIP_DIRS = {"notebooks", "reports", "logs"}


def default_notebooks_dir() -> Path:
    return Path(__file__).resolve().parents[1] / "notebooks"


@dataclass
class Options:
    resume: bool = False
    html: bool = True
    notebooks_dir: Path | None = None  # None: the repository's notebooks/
    reports_dir: Path | None = None  # None: config's reports_dir, else next to the repository
    kernel_name: str = "python3"


@dataclass
class RunResult:
    ts: str
    results_dir: Path
    complete_json: Path
    index_html: Path | None
    failures: list[str] = field(default_factory=list)  # "model: stage: error"

    @property
    def ok(self) -> bool:
        return not self.failures


# --- model family without loading weights ------------------------------------------------------


_GGUF_MODEL_TYPES = {"qwen2moe": "qwen2_moe", "qwen3moe": "qwen3_moe"}
# GGUF value types: struct format of the scalars; 8 is a string, 9 an array.
_GGUF_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q",
                 11: "q", 12: "d"}


def gguf_metadata(path: str | Path) -> dict:
    """The scalar and string key/values of a GGUF file's header (arrays skipped).

    A small reader instead of gguf.GGUFReader, which parses every tokenizer array (seconds).
    """
    import struct

    with open(path, "rb") as f:
        def read(fmt):
            return struct.unpack("<" + fmt, f.read(struct.calcsize("<" + fmt)))[0]

        def string():
            return f.read(read("Q")).decode("utf-8", errors="replace")

        def skip(value_type):
            if value_type == 8:
                f.seek(read("Q"), 1)
            elif value_type == 9:
                item_type, count = read("I"), read("Q")
                if item_type in _GGUF_SCALARS:
                    f.seek(count * struct.calcsize(_GGUF_SCALARS[item_type]), 1)
                else:
                    for _ in range(count):
                        skip(item_type)
            else:
                f.seek(struct.calcsize(_GGUF_SCALARS[value_type]), 1)

        if f.read(4) != b"GGUF":
            raise ValueError(f"{path} is not a GGUF file")
        read("I")  # version
        read("Q")  # tensor count
        out = {}
        for _ in range(read("Q")):
            key, value_type = string(), read("I")
            if value_type in _GGUF_SCALARS:
                out[key] = read(_GGUF_SCALARS[value_type])
            elif value_type == 8:
                out[key] = string()
            else:
                skip(value_type)
        return out


def probe(spec: str, trust_remote_code: bool = False) -> tuple[str, bool]:
    """(family name, is MoE) of a model spec from its config or GGUF header alone.

    Raises ModelLoadError / UnsupportedArchitectureError with a one-line message.
    """
    from . import arch, models

    source, where = models.resolve(spec)
    if source in ("alias", "gguf"):
        meta = gguf_metadata(where)
        gguf_arch = meta.get("general.architecture") or "llama"
        experts = int(meta.get(f"{gguf_arch}.expert_count") or 0)
        model_type = _GGUF_MODEL_TYPES.get(gguf_arch, gguf_arch)
        try:
            family = arch.family_for_model_type(model_type)
        except arch.UnsupportedArchitectureError:
            log.warning("GGUF architecture '%s' of %s not known to sw_lib.arch; assuming llama",
                        gguf_arch, spec)
            family = arch.family_for_model_type("llama")
        return family.name, family.moe is not None or experts > 0
    config = models.load_config(where, spec, trust_remote_code)
    family = arch.family_for_model_type(config.model_type)
    return family.name, family.moe is not None


# --- one notebook ----------------------------------------------------------------------------


def declared_parameters(notebook: Path) -> list[str]:
    """Names assigned in the notebook's `parameters` cell.

    Read with Python's own parser: papermill's `inspect_notebook` silently drops a line whose
    comment contains `=` (e.g. `ratio = 1.02  # loss >= this`); it is the fallback for a cell
    that is not plain Python.
    """
    import ast

    import nbformat

    nb = nbformat.read(str(notebook), as_version=4)
    cell = next((c for c in nb.cells if c.cell_type == "code"
                 and "parameters" in c.metadata.get("tags", [])), None)
    if cell is None:
        return []
    try:
        tree = ast.parse(cell.source)
    except SyntaxError:
        import papermill

        return list(papermill.inspect_notebook(str(notebook)))
    names: list[str] = []
    for node in tree.body:
        targets = node.targets if isinstance(node, ast.Assign) else (
            [node.target] if isinstance(node, ast.AnnAssign) else [])
        names += [t.id for t in targets if isinstance(t, ast.Name) and t.id not in names]
    return names


def export_html(notebook: Path, html: Path) -> Path:
    """Export an executed notebook to a self-contained HTML page (figures as base64 PNG)."""
    import nbformat
    from nbconvert import HTMLExporter

    nb = nbformat.read(str(notebook), as_version=4)
    exporter = HTMLExporter(embed_images=True)
    body, _ = exporter.from_notebook_node(
        nb, resources={"metadata": {"name": notebook.stem, "path": str(notebook.parent)}})
    html.parent.mkdir(parents=True, exist_ok=True)
    tmp = html.with_name(html.name + ".tmp")
    tmp.write_text(body, encoding="utf-8")
    os.replace(tmp, html)
    return html


def _error_line(err: BaseException) -> str:
    from papermill.exceptions import PapermillExecutionError

    if isinstance(err, PapermillExecutionError):
        text = f"{err.ename}: {err.evalue}"
    else:
        text = f"{type(err).__name__}: {err}"
    line = (text.strip().splitlines() or [type(err).__name__])[0]
    return line if len(line) <= 500 else line[:497] + "..."


def _snapshot(root: Path) -> dict[Path, int]:
    """mtime of every result file under root (not notebooks/reports/logs)."""
    out = {}
    if not root.is_dir():
        return out
    for path in root.rglob("*"):
        rel = path.relative_to(root)
        if path.is_file() and rel.parts[0] not in _SKIP_DIRS and not path.name.endswith(".tmp"):
            out[path] = path.stat().st_mtime_ns
    return out


def _kernel_manager_class(log_file: Path | None):
    """A kernel manager whose kernel process writes its own stdout/stderr (start-up warnings,
    crashes) to `log_file` instead of the console; the notebook's outputs are unaffected."""
    from jupyter_client import AsyncKernelManager

    if log_file is None:
        return AsyncKernelManager

    class _LoggedKernelManager(AsyncKernelManager):
        async def start_kernel(self, **kw):
            stream = open(log_file, "a", encoding="utf-8")  # noqa: SIM115 -- the kernel's
            kw.setdefault("stdout", stream)
            kw.setdefault("stderr", stream)
            try:
                return await super().start_kernel(**kw)
            finally:
                stream.close()  # the child keeps its own copy of the descriptor

    return _LoggedKernelManager


def execute(notebook: Path, out_notebook: Path, report: Path | None, available: dict,
            watch: Path, kernel_name: str = "python3", log_file: Path | None = None) -> dict:
    """Run one notebook with the parameters it declares; return its stage record.

    `watch` is the folder whose new or changed files become the stage's `outputs`;
    `log_file` receives the kernel process's own output.
    """
    import papermill

    record = {"notebook": str(out_notebook), "report": None, "outputs": [],
              "started": datetime.now().isoformat(timespec="seconds")}
    start = time.perf_counter()
    if not notebook.is_file():
        return results.stage_record("failed", f"notebook {notebook} not found", 0.0, **record)
    declared = declared_parameters(notebook)
    parameters = {k: available[k] for k in declared if k in available}
    missing = [k for k in declared if k not in available]
    if missing:
        log.debug("%s: keeps its own defaults for %s", notebook.name, ", ".join(missing))
    record["parameters"] = parameters
    before = _snapshot(watch)
    status, error = "ok", None
    out_notebook.parent.mkdir(parents=True, exist_ok=True)
    try:
        papermill.execute_notebook(str(notebook), str(out_notebook), parameters=parameters,
                                   kernel_name=kernel_name, progress_bar=False,
                                   log_output=False, cwd=str(notebook.parent),
                                   kernel_manager_class=_kernel_manager_class(log_file),
                                   shutdown_kernel="immediate")  # outputs are saved by then
    except KeyboardInterrupt:
        raise
    except Exception as err:  # noqa: BLE001 -- any failure is recorded, the run goes on
        if getattr(err, "ename", None) == "KeyboardInterrupt":  # Ctrl-C reached the kernel too
            raise KeyboardInterrupt from err
        status, error = "failed", _error_line(err)
        log.debug("%s failed", notebook.name, exc_info=True)
    after = _snapshot(watch)
    record["outputs"] = sorted(str(p.relative_to(watch)) for p, m in after.items()
                               if before.get(p) != m)
    if report is not None and out_notebook.is_file():
        try:
            record["report"] = str(export_html(out_notebook, report))
        except Exception as err:  # noqa: BLE001
            log.warning("HTML export of %s failed: %s", out_notebook.name, _error_line(err))
    return results.stage_record(status, error, round(time.perf_counter() - start, 3), **record)


# --- one model -------------------------------------------------------------------------------


@dataclass
class _Model:
    spec: str
    paths: ModelPaths
    family: str | None = None
    is_moe: bool | None = None
    stages: dict = field(default_factory=dict)

    @property
    def slug(self) -> str:
        return self.paths.root.name


def _absolute_if_local(spec: str) -> str:
    """A model spec that names a local file or folder, made absolute (kernels may run
    elsewhere); aliases and hub ids unchanged."""
    path = Path(spec).expanduser()
    return str(path.resolve()) if path.exists() else spec


def _absolute_paths(parameters: dict) -> dict:
    out = dict(parameters)
    if out.get("cache_dir"):
        out["cache_dir"] = str(Path(out["cache_dir"]).expanduser().resolve())
    return out


def _progress(model: _Model, stage: str, record: dict) -> None:
    seconds = record.get("seconds")
    note = ("(reused)" if record.get("reused") else
            record.get("error") or record.get("reason") or "")
    log.info("%-28s %-26s %-7s %7s  %s", model.slug, stage, record["status"],
             f"{seconds:.1f} s" if seconds is not None else "-", note)


def _reusable(previous: dict | None, parameters: dict, root: Path, required: list[Path]) -> bool:
    """A finished stage can be kept: ok, same parameters, its notebook and files all there."""
    if not previous or previous.get("status") != "ok":
        return False
    if previous.get("parameters") != parameters:
        return False
    needed = [Path(previous["notebook"])] if previous.get("notebook") else []
    needed += [root / rel for rel in previous.get("outputs", [])]
    return all(p.exists() for p in needed + required)


def _write_analysis(model: _Model, config: dict, check: bool = False) -> None:
    analysis = results.assemble_analysis(model.paths, model=model.spec, family=model.family,
                                         is_moe=model.is_moe, config=config,
                                         stages=model.stages)
    results.write_json(model.paths.analysis_json, analysis)
    errors = results.validation_errors(results.read_json(model.paths.analysis_json)) if check else []
    if errors:
        log.warning("%s does not match the schema: %s", model.paths.analysis_json.name,
                    "; ".join(errors[:3]))


def _run_model(model: _Model, config: dict, options: Options, notebooks_dir: Path,
               previous: dict) -> None:
    paths = model.paths
    runtime = config["runtime"]
    start = time.perf_counter()
    try:
        model.family, model.is_moe = probe(model.spec, runtime.get("trust_remote_code", False))
        model.stages["resolve"] = results.stage_record(
            "ok", None, round(time.perf_counter() - start, 3))
    except KeyboardInterrupt:
        raise
    except Exception as err:  # noqa: BLE001
        model.stages["resolve"] = results.stage_record(
            "failed", _error_line(err), round(time.perf_counter() - start, 3))
    _progress(model, "resolve", model.stages["resolve"])

    available = _absolute_paths(config_mod.notebook_parameters(config))
    available.update(model=_absolute_if_local(model.spec), output_dir=str(paths.root),
                     run_timestamp=paths.ts)
    redone: set[str] = set()
    for stage in MODEL_STAGES:
        record = _stage_for_model(model, stage, available, options, notebooks_dir,
                                  previous.get(stage), redone)
        model.stages[stage] = record
        _write_analysis(model, config)
        _progress(model, stage, record)


def _stage_for_model(model: _Model, stage: str, available: dict, options: Options,
                     notebooks_dir: Path, previous: dict | None, redone: set[str]) -> dict:
    paths = model.paths
    if model.stages["resolve"]["status"] != "ok":
        return results.stage_record("skipped", reason="model could not be resolved")
    if stage == "04_moe_routing" and not model.is_moe:
        return results.stage_record("skipped", reason="not a mixture-of-experts model")
    upstream = DEPENDS_ON.get(stage)
    if upstream and model.stages[upstream]["status"] != "ok":
        return results.stage_record("skipped", reason=f"{upstream} did not succeed")
    notebook = notebooks_dir / f"{stage}.ipynb"
    if options.resume and notebook.is_file() and upstream not in redone:
        declared = declared_parameters(notebook)
        parameters = {k: available[k] for k in declared if k in available}
        if _reusable(previous, parameters, paths.root, REQUIRED_OUTPUTS[stage](paths)):
            return {**previous, "reused": True}
    redone.add(stage)
    log.debug("running %s for %s", stage, model.spec)
    record = execute(notebook, paths.notebook(stage),
                     paths.report(stage) if options.html else None, available, paths.root,
                     options.kernel_name, paths.log_file)
    missing = [p for p in REQUIRED_OUTPUTS[stage](paths) if not p.is_file()]
    if record["status"] == "ok" and missing:  # the notebook broke its contract
        record.update(status="failed", error="finished without writing "
                      + ", ".join(str(p.relative_to(paths.root)) for p in missing))
    return record


# --- logging -----------------------------------------------------------------------------------


class _FileLog:
    """Send the library's and papermill's log records to one log file while it is open;
    papermill's records (e.g. warnings about parameters) go only there, not to the console."""

    def __init__(self, path: Path):
        path.parent.mkdir(parents=True, exist_ok=True)
        self.handler = logging.FileHandler(path, encoding="utf-8")
        self.handler.setLevel(logging.DEBUG)
        self.handler.setFormatter(logging.Formatter(
            "%(asctime)s %(levelname)s %(name)s: %(message)s"))
        self.loggers = [logging.getLogger("sw_lib"), logging.getLogger("papermill")]

    def __enter__(self):
        self._saved = [(lg.level, lg.propagate) for lg in self.loggers]
        library, papermill = self.loggers
        for lg in self.loggers:
            lg.addHandler(self.handler)
        if library.level == logging.NOTSET or library.level > logging.DEBUG:
            library.setLevel(logging.DEBUG)
        papermill.setLevel(logging.INFO)  # its DEBUG records copy every kernel message
        papermill.propagate = False
        return self

    def __exit__(self, *exc):
        for lg, (level, propagate) in zip(self.loggers, self._saved):
            lg.removeHandler(self.handler)
            lg.setLevel(level)
            lg.propagate = propagate
        self.handler.close()


# --- the whole run -----------------------------------------------------------------------------


def run(config: dict, options: Options | None = None) -> RunResult:
    """Analyse every model of `config` (validated by sw_lib.config) and compare them."""
    from . import reports

    options = options or Options()
    notebooks_dir = Path(options.notebooks_dir or default_notebooks_dir()).resolve()
    results_dir = Path(config["results_dir"]).expanduser().resolve()
    results_dir.mkdir(parents=True, exist_ok=True)
    ts = results.latest_timestamp(results_dir) if options.resume else None
    if options.resume and ts:
        log.info("resuming run %s", ts)
    elif options.resume:
        log.info("nothing to resume in %s; starting a new run", results_dir)
    ts = ts or results.new_timestamp()
    run_paths = RunPaths(results_dir, ts)
    slugs = results.unique_slugs(config["models"])
    log.info("run %s: %d model(s) -> %s", ts, len(slugs), results_dir)

    any_redone = False
    failures: list[str] = []
    for spec, slug_ in zip(config["models"], slugs):
        paths = run_paths.model(slug_).make()
        before = results.read_json_if_exists(paths.analysis_json) if options.resume else None
        model = _Model(spec, paths)
        with _FileLog(paths.log_file):
            log.info("model %s (%s) -> %s", spec, slug_, paths.root)
            log.debug("configuration:\n%s", config_mod.dump(config))
            try:
                _run_model(model, config, options, notebooks_dir,
                           (before or {}).get("stages", {}))
            except KeyboardInterrupt:
                _interrupted(model, config)
                raise
            _write_analysis(model, config, check=True)
        any_redone |= any(not s.get("reused") and s["status"] != "skipped"
                          for name, s in model.stages.items() if name != "resolve")
        failures += [f"{spec}: {name}: {s['error']}" for name, s in model.stages.items()
                     if s["status"] == "failed"]

    with _FileLog(run_paths.log_file):
        comparison_record = _compare(run_paths, slugs, config, options, notebooks_dir, any_redone)
    if comparison_record["status"] == "failed":
        failures.append(f"{COMPARISON_STAGE}: {comparison_record['error']}")

    reports_dir = options.reports_dir or config.get("reports_dir")
    reports_dir = Path(reports_dir) if reports_dir else reports.default_reports_dir(results_dir)
    index = reports.index_path(reports_dir) if options.html else None
    _finish_complete(run_paths, slugs, config, comparison_record, index)
    if index is not None:
        reports.write_index(reports_dir, results_dir)
    return RunResult(ts, results_dir, run_paths.complete_json, index, failures)


def _interrupted(model: _Model, config: dict) -> None:
    for stage in ("resolve", *MODEL_STAGES):
        model.stages.setdefault(stage, results.stage_record("failed", "interrupted"))
    _write_analysis(model, config)


def _compare(run_paths: RunPaths, slugs: list[str], config: dict, options: Options,
             notebooks_dir: Path, any_redone: bool) -> dict:
    """Stage 05 over every model of the run; the complete JSON is written before it runs
    (the notebook adds the comparison) and after it (with its status)."""
    previous = results.read_json_if_exists(run_paths.complete_json) if options.resume else None
    previous_record = ((previous or {}).get("stages") or {}).get(COMPARISON_STAGE)
    notebook = notebooks_dir / f"{COMPARISON_STAGE}.ipynb"
    available = {"output_dir": str(run_paths.results_dir), "results_dir": str(run_paths.results_dir),
                 "run_timestamp": run_paths.ts, "models": slugs}
    if options.resume and not any_redone and notebook.is_file():
        parameters = {k: available[k] for k in declared_parameters(notebook) if k in available}
        if (_reusable(previous_record, parameters, run_paths.results_dir, [run_paths.complete_json])
                and previous.get("comparison")):
            record = {**previous_record, "reused": True}
            log.info("%-28s %-26s %-7s %7s  (reused)", "(all models)", COMPARISON_STAGE, "ok", "-")
            return record
    results.write_json(run_paths.complete_json, results.assemble_complete(
        run_paths, slugs, config, stages={}, comparison=None))
    record = execute(notebook, run_paths.notebook(),
                     run_paths.report() if options.html else None, available,
                     run_paths.results_dir, options.kernel_name, run_paths.log_file)
    # Only the run-level files count as this stage's outputs (not the models' folders).
    record["outputs"] = [o for o in record["outputs"]
                         if not any(o.startswith(s + "/") for s in slugs)
                         and not o.startswith("logs/")]
    seconds = record.get("seconds")
    log.info("%-28s %-26s %-7s %7s  %s", "(all models)", COMPARISON_STAGE, record["status"],
             f"{seconds:.1f} s" if seconds is not None else "-", record.get("error") or "")
    return record


def _finish_complete(run_paths: RunPaths, slugs: list[str], config: dict, record: dict,
                     index: Path | None) -> None:
    written = results.read_json_if_exists(run_paths.complete_json) or {}
    comparison = written.get("comparison") if record["status"] == "ok" else None
    complete = results.assemble_complete(
        run_paths, slugs, config, stages={COMPARISON_STAGE: record}, comparison=comparison,
        reports_index=str(index) if index else None)
    results.write_json(run_paths.complete_json, complete)
    errors = results.validation_errors(complete)
    if errors:
        log.warning("complete_analysis JSON does not match the schema: %s", "; ".join(errors[:3]))
