"""The batch pipeline: the stage table (sw_lib.stages) run for every model, then over the run.

Before any work: every model is resolved and checked (sw_lib.models.inspect), the results and
reports folders must be writable, and the results folder is locked for this run; a problem
there raises `InputError` (one line) and nothing is created. Then for each model the
per-model stages run in table order (a MoE-only stage only for MoE models), and the whole-run
stages once over all models (sw_lib.runner executes each notebook). Which process runs each
model's chain (`analyse_model`) is the executor's business (sw_lib.executors: one after another
here, or in parallel as Ray tasks on a cluster); this module only orchestrates.

Robustness: a stage that fails is recorded (status, one-line error, seconds) and the run goes
on with the next model; stages that need a failed one are skipped. `analysis_<ts>.json` is
rewritten atomically after every stage, which is what `--resume` reads: a stage is redone
only if its record is not ok, its parameters or notebook changed, one of its files is
missing, or a stage it depends on was redone; a redone stage's old files are deleted first.
"""
from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from . import config as config_mod
from . import executors, reports, results, runner, stages
from .results import ModelPaths, RunPaths
from .runlock import FolderLocked, RunLock

if TYPE_CHECKING:
    from .models import ModelInfo

log = logging.getLogger("sw_lib.pipeline")


class InputError(ValueError):
    """Bad input found before any work (model, folder, --resume); one line, nothing written."""


def default_notebooks_dir() -> Path:
    return Path(__file__).resolve().parents[1] / "notebooks"


@dataclass
class Options:
    resume: str | bool | None = None  # None/False: new run; True/"latest": newest; or a timestamp
    html: bool = True
    notebooks_dir: Path | None = None  # None: the repository's notebooks/
    reports_dir: Path | None = None  # None: config's reports_dir, else reports.default_reports_dir
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


# --- before any work ---------------------------------------------------------------------------


@dataclass
class Plan:
    results_dir: Path
    reports_dir: Path | None
    models: list[ModelInfo]
    slugs: list[str]
    resume_ts: str | None  # the run to resume, None: a new run
    check_seconds: list[float] = field(default_factory=list)  # per model
    executor: executors.Executor = field(default_factory=executors.Local)


def check_inputs(config: dict, options: Options) -> Plan:
    """Everything that can be checked before work starts; raises InputError, creates nothing."""
    results_dir = Path(config["results_dir"]).expanduser().resolve()
    _check_writable(results_dir, "results folder", "--results-dir")
    reports_dir = None
    if options.html:
        chosen = options.reports_dir or config.get("reports_dir")
        reports_dir = (Path(chosen).expanduser().resolve() if chosen
                       else reports.default_reports_dir(results_dir))
        _check_writable(reports_dir, "reports folder", "--reports-dir")
    trust = config["runtime"].get("trust_remote_code", False)
    infos, seconds = [], []
    for spec in config["models"]:
        start = time.perf_counter()
        infos.append(_inspect(spec, trust))
        seconds.append(round(time.perf_counter() - start, 3))
    resume_ts = _resume_timestamp(results_dir, options.resume)
    try:
        executor = executors.from_config(config["runtime"], infos)
    except executors.ExecutorError as err:
        raise InputError(str(err)) from None
    return Plan(results_dir, reports_dir, infos, results.unique_slugs(config["models"]),
                resume_ts, seconds, executor)


def _inspect(spec: str, trust_remote_code: bool) -> ModelInfo:
    from . import models  # torch: only once there is a run to check

    try:
        return models.inspect(spec, trust_remote_code)
    except Exception as err:  # noqa: BLE001 -- every way a model can be unusable is one line
        text = runner.error_line(err).removeprefix(f"{type(err).__name__}: ")
        raise InputError(text if spec in text else f"model '{spec}': {text}") from None


def _check_writable(folder: Path, what: str, flag: str) -> None:
    existing = folder
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise InputError(f"{what} '{folder}' cannot be created: '{existing}' is a file; "
                         f"choose another with {flag}")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise InputError(f"{what} '{folder}' is not writable ('{existing}': permission "
                         f"denied); choose another with {flag}")


def _resume_timestamp(results_dir: Path, resume: str | bool | None) -> str | None:
    if not resume:
        return None
    runs = results.run_timestamps(results_dir)
    if resume in (True, "latest"):
        if not runs:
            log.info("nothing to resume in %s; starting a new run", results_dir)
            return None
        log.info("resuming run %s (the newest of %d in %s)", runs[-1], len(runs), results_dir)
        return runs[-1]
    if not results.is_timestamp(resume):
        raise InputError(f"--resume: '{resume}' is not a run timestamp (YYYYMMDD_HHMMSS)")
    if resume not in runs:
        known = ", ".join(runs[-5:]) or "none"
        raise InputError(f"--resume: no run {resume} in '{results_dir}' (newest runs: {known})")
    log.info("resuming run %s", resume)
    return resume


# --- one stage -------------------------------------------------------------------------------


def _available(config: dict, spec: str, paths: ModelPaths) -> dict:
    """The parameter namespace the model's notebooks draw from."""
    available = config_mod.notebook_parameters(config)
    if available.get("cache_dir"):  # kernels run in the notebooks' folder
        available["cache_dir"] = str(Path(available["cache_dir"]).expanduser().resolve())
    path = Path(spec).expanduser()
    available.update(model=str(path.resolve()) if path.exists() else spec,
                     output_dir=str(paths.root), run_timestamp=paths.ts)
    return available


def _reusable(previous: dict | None, stage: str, notebook: Path, parameters: dict,
              files) -> bool:
    """A finished stage can be kept: ok, same parameters and notebook, all its files there."""
    if not previous or previous.get("status") != "ok" or not notebook.is_file():
        return False
    if previous.get("parameters") != parameters:
        return False
    if previous.get("notebook_sha256") != runner.notebook_hash(notebook):
        return False
    needed = [Path(previous["notebook"])] if previous.get("notebook") else []
    needed += [files.root / rel for rel in previous.get("outputs", [])]
    return all(p.exists() for p in needed) and not files.missing(stage)


def _run_stage(stage: stages.Stage, files, available: dict, options: Options,
               notebooks_dir: Path, previous: dict | None, may_reuse: bool,
               log_file: Path, timeout: float | None) -> dict:
    """Reuse a finished stage (on --resume) or clear its old files and run its notebook."""
    notebook = notebooks_dir / stage.notebook
    if options.resume and may_reuse and notebook.is_file():
        declared = runner.declared_parameters(notebook)
        parameters = {k: available[k] for k in declared if k in available}
        if _reusable(previous, stage.name, notebook, parameters, files):
            return {**previous, "reused": True}
    removed = files.clear(stage.name)
    if removed:
        log.debug("%s: removed %d file(s) of an earlier attempt", stage.name, len(removed))
    record = runner.execute(notebook, files.notebook(stage.name),
                            files.report(stage.name) if options.html else None, available,
                            files.root, options.kernel_name, log_file, timeout)
    missing = files.missing(stage.name)
    if record["status"] == "ok" and missing:  # the notebook broke its contract
        record.update(status="failed", error="finished without writing "
                      + ", ".join(str(p.relative_to(files.root)) for p in missing))
    return record


def _progress(who: str, stage: str, record: dict) -> None:
    seconds = record.get("seconds")
    note = ("(reused)" if record.get("reused") else
            record.get("error") or record.get("reason") or "")
    log.info("%-28s %-26s %-7s %7s  %s", who, stage, record["status"],
             f"{seconds:.1f} s" if seconds is not None else "-", note)


# --- one model -------------------------------------------------------------------------------


@dataclass
class _Model:
    info: ModelInfo
    paths: ModelPaths
    stages: dict = field(default_factory=dict)

    @property
    def slug(self) -> str:
        return self.paths.root.name


def _skip_reason(stage: stages.Stage, model: _Model) -> str | None:
    if not stage.applies(model.info.is_moe):
        return "not a mixture-of-experts model"
    failed = [d for d in stage.depends_on if model.stages[d]["status"] != "ok"]
    return f"{failed[0]} did not succeed" if failed else None


def _write_analysis(model: _Model, config: dict, check: bool = False) -> None:
    analysis = results.assemble_analysis(model.paths, model=model.info.spec,
                                         family=model.info.family, is_moe=model.info.is_moe,
                                         config=config, stages=model.stages)
    results.write_json(model.paths.analysis_json, analysis)
    errors = results.validation_errors(analysis) if check else []
    if errors:
        log.warning("%s does not match the schema: %s", model.paths.analysis_json.name,
                    "; ".join(errors[:3]))


def _run_model(model: _Model, config: dict, options: Options, notebooks_dir: Path,
               previous: dict, check_seconds: float) -> None:
    model.stages["resolve"] = results.stage_record("ok", None, check_seconds)
    _progress(model.slug, "resolve", model.stages["resolve"])
    available = _available(config, model.info.spec, model.paths)
    redone: set[str] = set()
    for stage in (s for s in stages.STAGES if s.applies_to != stages.WHOLE_RUN):
        reason = _skip_reason(stage, model)
        if reason:
            record = results.stage_record("skipped", reason=reason)
        else:
            record = _run_stage(stage, model.paths, available, options, notebooks_dir,
                                previous.get(stage.name), not redone & set(stage.depends_on),
                                model.paths.log_file, config["runtime"].get("stage_timeout"))
            if not record.get("reused"):
                redone.add(stage.name)
        model.stages[stage.name] = record
        _write_analysis(model, config)
        _progress(model.slug, stage.name, record)
    peak = results.peak_memory(model.stages)
    if peak:
        log.info("%s: peak memory %.0f MiB (%s)", model.slug, peak["mib"], peak["stage"])


def _interrupted(model: _Model, config: dict) -> None:
    for name in ("resolve", *stages.MODEL_STAGES):
        model.stages.setdefault(name, results.stage_record("failed", "interrupted"))
    _write_analysis(model, config)


@dataclass
class ModelJob:
    """One model's share of a run: what its stage chain needs, picklable for a Ray task."""
    info: ModelInfo
    paths: ModelPaths
    config: dict
    options: Options
    notebooks_dir: Path
    resume: bool
    check_seconds: float


def analyse_model(job: ModelJob) -> dict:
    """Run one model's stage chain (both executors call this); returns its stage records.
    A stage that fails is recorded, never raised; the analysis JSON is on disk throughout."""
    before = results.read_json_if_exists(job.paths.analysis_json) if job.resume else None
    model = _Model(job.info, job.paths)
    with _FileLog(job.paths.log_file):
        log.info("model %s (%s) -> %s", job.info.spec, model.slug, job.paths.root)
        log.debug("configuration:\n%s", config_mod.dump(job.config))
        try:
            _run_model(model, job.config, job.options, job.notebooks_dir,
                       (before or {}).get("stages", {}), job.check_seconds)
        except KeyboardInterrupt:
            _interrupted(model, job.config)
            raise
        _write_analysis(model, job.config, check=True)
    return model.stages


def record_lost(job: ModelJob, error: str) -> dict:
    """The model's chain died with its process (a cluster node lost, interrupted): the stages
    it finished are kept from its analysis JSON, every other one is failed with `error`."""
    written = results.read_json_if_exists(job.paths.analysis_json) or {}
    model = _Model(job.info, job.paths, dict(written.get("stages") or {}))
    model.stages.setdefault("resolve", results.stage_record("ok", None, job.check_seconds))
    for name in stages.MODEL_STAGES:
        record = model.stages.get(name)
        if record is None:
            model.stages[name] = results.stage_record("failed", error)
    _write_analysis(model, job.config)
    return model.stages


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
    """Analyse every model of `config` (validated by sw_lib.config) and compare them.

    Raises InputError before any work when a model, a folder or --resume is unusable, or
    when another run holds the results folder.
    """
    options = options or Options()
    notebooks_dir = Path(options.notebooks_dir or default_notebooks_dir()).resolve()
    plan = check_inputs(config, options)
    try:
        with RunLock(plan.results_dir):
            return _run_locked(plan, config, options, notebooks_dir)
    except FolderLocked as err:
        raise InputError(str(err)) from None
    finally:
        plan.executor.close()


def _run_locked(plan: Plan, config: dict, options: Options, notebooks_dir: Path) -> RunResult:
    ts = plan.resume_ts or results.new_timestamp(plan.results_dir)
    run_paths = RunPaths(plan.results_dir, ts)
    run_paths.log_file.parent.mkdir(parents=True, exist_ok=True)
    run_paths.log_file.touch()  # claims the timestamp in this folder
    log.info("run %s: %d model(s) -> %s", ts, len(plan.slugs), plan.results_dir)

    jobs = [ModelJob(info, run_paths.model(slug_).make(), config, options, notebooks_dir,
                     plan.resume_ts is not None, seconds)
            for info, slug_, seconds in zip(plan.models, plan.slugs, plan.check_seconds)]
    any_redone = False
    failures: list[str] = []
    for job, model_stages in zip(jobs, plan.executor.run(jobs, analyse_model, record_lost)):
        any_redone |= any(not s.get("reused") and s["status"] != "skipped"
                          for name, s in model_stages.items() if name != "resolve")
        failures += [f"{job.info.spec}: {name}: {s['error']}"
                     for name, s in model_stages.items() if s["status"] == "failed"]

    with _FileLog(run_paths.log_file):
        comparison_record = _compare(run_paths, plan, config, options, notebooks_dir, any_redone)
    if comparison_record["status"] == "failed":
        failures.append(f"{results.COMPARISON_STAGE}: {comparison_record['error']}")

    index = reports.index_path(plan.reports_dir) if plan.reports_dir else None
    _finish_complete(run_paths, plan.slugs, config, comparison_record, index)
    if index is not None:
        reports.write_index(plan.reports_dir, plan.results_dir)
    return RunResult(ts, plan.results_dir, run_paths.complete_json, index, failures)


def _compare(run_paths: RunPaths, plan: Plan, config: dict, options: Options,
             notebooks_dir: Path, any_redone: bool) -> dict:
    """The whole-run stage over every model; the complete JSON is written before it runs
    (the notebook adds the comparison) and after it (with its status)."""
    stage = stages.stage(results.COMPARISON_STAGE)
    previous = results.read_json_if_exists(run_paths.complete_json) if plan.resume_ts else None
    previous_record = ((previous or {}).get("stages") or {}).get(stage.name)
    available = {"output_dir": str(run_paths.results_dir), "results_dir": str(run_paths.results_dir),
                 "run_timestamp": run_paths.ts, "models": plan.slugs}
    if previous_record and previous_record.get("status") == "ok" and not previous.get("comparison"):
        previous_record = None  # the comparison it wrote is gone
    if not previous_record or any_redone:
        results.write_json(run_paths.complete_json, results.assemble_complete(
            run_paths, plan.slugs, config, stages={}, comparison=None))
    record = _run_stage(stage, run_paths, available, options, notebooks_dir, previous_record,
                        not any_redone, run_paths.log_file, config["runtime"].get("stage_timeout"))
    if not record.get("reused"):
        # Only the run-level files count as this stage's outputs (not the models' folders).
        record["outputs"] = [o for o in record["outputs"]
                             if not any(o.startswith(s + "/") for s in plan.slugs)
                             and not o.startswith("logs/")]
    _progress("(all models)", stage.name, record)
    return record


def _finish_complete(run_paths: RunPaths, slugs: list[str], config: dict, record: dict,
                     index: Path | None) -> None:
    written = results.read_json_if_exists(run_paths.complete_json) or {}
    comparison = written.get("comparison") if record["status"] == "ok" else None
    complete = results.assemble_complete(
        run_paths, slugs, config, stages={results.COMPARISON_STAGE: record},
        comparison=comparison, reports_index=str(index) if index else None)
    results.write_json(run_paths.complete_json, complete)
    errors = results.validation_errors(complete)
    if errors:
        log.warning("complete_analysis JSON does not match the schema: %s", "; ".join(errors[:3]))
