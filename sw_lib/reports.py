"""The HTML index of every run's reports (`reports/index.html`).

The index lists, newest run first, each run's models: what was found (super weights with their
verdicts, the perplexity ratio of zeroing them all, the significant accuracy changes, in the
words of `sw_lib.findings`), a thumbnail of the key figure, links to the HTML reports of their
notebooks (in the order of the stage table), their JSON and log, and each failed stage with its
one-line error. It covers every results folder
that ever wrote to it: their paths are kept in `runs.json` beside the index, so one index
serves several result folders. Links are relative, so a reports folder moved together with the
results keeps working. A run writes only its own results folder and, by default, this
project's `reports/` (when the results lie inside the project), never another repository's.
"""
from __future__ import annotations

import html
import os
import re
from datetime import datetime
from pathlib import Path

from . import findings, results, stages
from .runlock import INDEX_LOCK_NAME, RunLock

INDEX = "index.html"
REGISTRY = "runs.json"
_REPORT = re.compile(r"^(?P<stage>.+)_(?P<ts>\d{8}_\d{6})\.html$")


def project_root() -> Path | None:
    """This project's source checkout (the folder holding sw_lib/ and pyproject.toml), or
    None when sw_lib runs from an installed package."""
    root = Path(__file__).resolve().parents[1]
    return root if (root / "pyproject.toml").is_file() and (root / "sw_lib").is_dir() else None


def default_reports_dir(results_dir: str | Path) -> Path:
    """This project's `reports/` when results_dir lies inside the project's checkout, else
    `<results_dir>/reports` (never the `reports/` of some other repository)."""
    results_dir = Path(results_dir).expanduser().resolve()
    root = project_root()
    return root / "reports" if root and results_dir.is_relative_to(root) else results_dir / "reports"


def index_path(reports_dir: str | Path) -> Path:
    return Path(reports_dir) / INDEX


def _registered(reports_dir: Path, results_dir: Path) -> list[Path]:
    """The result folders this index covers (relative paths in runs.json), plus this one."""
    registry = reports_dir / REGISTRY
    known = (results.read_json_if_exists(registry) or {}).get("results_dirs", [])
    folders = [(reports_dir / p).resolve() for p in known]
    if results_dir not in folders:
        folders.append(results_dir)
    folders = [f for f in folders if f.is_dir()]
    results.write_json(registry, {"results_dirs": [os.path.relpath(f, reports_dir)
                                                   for f in folders]})
    return folders


def collect_runs(results_dir: Path) -> list[dict]:
    """Every run found under a results folder: timestamp, status, models (with their analysis
    JSON when there is one) and report pages."""
    runs: dict[str, dict] = {}

    def run_for(ts: str) -> dict:
        return runs.setdefault(ts, {"ts": ts, "results_dir": results_dir, "status": None,
                                    "models": {}, "reports": []})

    def model_for(ts: str, slug_: str) -> dict:
        return run_for(ts)["models"].setdefault(
            slug_, {"status": None, "model": slug_, "error": None, "reports": [],
                    "folder": results_dir / slug_})

    for page in _pages(results_dir / "reports"):
        if (m := _REPORT.match(page.name)):
            run_for(m["ts"])["reports"].append((m["stage"], page))
    for model_dir in sorted(p for p in results_dir.iterdir() if p.is_dir()):
        for page in _pages(model_dir / "reports"):
            if (m := _REPORT.match(page.name)):
                model_for(m["ts"], model_dir.name)["reports"].append((m["stage"], page))
        for analysis in (model_dir / "data").glob("analysis_*.json"):
            if (m := _ANALYSIS.match(analysis.name)):
                model_for(m["ts"], model_dir.name)
    for ts, run in runs.items():
        complete = results.read_json_if_exists(results_dir / f"complete_analysis_{ts}.json")
        if complete:
            run["status"] = complete.get("status")
            run["comparison"] = complete.get("comparison")
            run["order"] = [m["slug"] for m in complete.get("models", [])]  # as the run went
            for m in complete.get("models", []):
                model_for(ts, m["slug"]).update(status=m.get("status"), model=m.get("model"),
                                                error=m.get("error"))
        for slug_, entry in run["models"].items():
            entry["analysis"] = results.read_json_if_exists(
                results.ModelPaths(results_dir / slug_, ts).analysis_json)
    return sorted(runs.values(), key=lambda r: r["ts"], reverse=True)


_ANALYSIS = re.compile(r"^analysis_(?P<ts>\d{8}_\d{6})\.json$")


def _pages(folder: Path) -> list[Path]:
    """The HTML pages of a folder in stage-table order."""
    def key(page: Path):
        m = _REPORT.match(page.name)
        return (stages.order(m["stage"]) if m else len(stages.STAGES), page.name)

    return sorted(folder.glob("*.html"), key=key)


def _when(ts: str) -> str:
    return datetime.strptime(ts, results.TIMESTAMP_FORMAT).strftime("%Y-%m-%d %H:%M:%S")


# --- what the index says about a model ----------------------------------------------------------

# The figure shown as a model's thumbnail: the first of these the run wrote.
KEY_FIGURES = ("super_weight_distribution", "combined_analysis", "detection_iterations")


def _href(path: Path, base: Path) -> str:
    return html.escape(os.path.relpath(path, base))


def _link(path: Path, base: Path, text: str) -> str:
    return f'<a href="{_href(path, base)}">{html.escape(text)}</a>'


def _links(pages: list[tuple[str, Path]], base: Path) -> str:
    return " ".join(_link(p, base, stage) for stage, p in pages) or "&mdash;"


def model_facts(analysis: dict | None) -> list[str]:
    """The index's sentences about one model of a run: its super weights with their
    verdicts, what zeroing them all does to perplexity, and the significant accuracy changes."""
    if not analysis:
        return ["No analysis file (the run stopped before this model finished)."]
    facts = []
    try:
        det = analysis.get("detection")
        if det:
            facts += findings.detection(det).sentences[:3]
        combined = analysis.get("combined")
        if combined and combined.get("super_weights"):
            facts += findings.combined(combined).sentences[1:3]
    except (KeyError, TypeError, ValueError, AttributeError) as err:
        # A file of another schema version must not take the index down with it.
        facts.append(f"(its JSON could not be summarized: {type(err).__name__}: {err})")
    return facts


def _key_figure(paths: results.ModelPaths) -> Path | None:
    return next((paths.plot(name) for name in KEY_FIGURES if paths.plot(name).is_file()), None)


def _failures(entry: dict) -> list[str]:
    """Each failed stage with its one-line error."""
    stages_ = ((entry.get("analysis") or {}).get("stages") or {})
    lines = [f"{name}: {s.get('error')}" for name, s in stages_.items() if s.get("status") == "failed"]
    if not lines and entry.get("error"):
        lines.append(entry["error"])
    return lines


def _model_card(slug_: str, entry: dict, ts: str, base: Path) -> str:
    paths = results.ModelPaths(entry["folder"], ts)
    analysis = entry.get("analysis")
    status = entry.get("status") or (analysis or {}).get("status") or "incomplete"
    family = (analysis or {}).get("family")
    figure = _key_figure(paths)
    thumb = (f'<a class="thumb" href="{_href(figure, base)}"><img src="{_href(figure, base)}" '
             f'alt="key figure of {html.escape(slug_)}" width="260"></a>' if figure else "")
    facts = "".join(f"<li>{html.escape(f)}</li>" for f in model_facts(analysis))
    errors = "".join(f'<p class="error">failed: {html.escape(e)}</p>' for e in _failures(entry))
    data = [(name, path) for name, path in (
        ("analysis JSON", paths.analysis_json), ("detection JSON", paths.detection_json),
        ("individual JSON", paths.individual_summary_json),
        ("combined JSON", paths.combined_json), ("MoE JSON", paths.moe_json))
        if path.is_file()]
    files = " ".join(_link(p, base, name) for name, p in data)
    if paths.log_file.is_file():
        files += " " + _link(paths.log_file, base, "log")
    return (f'<div class="model {html.escape(status)}" id="{html.escape(ts)}-{html.escape(slug_)}">'
            f"{thumb}<h3>{html.escape(slug_)} <small>{html.escape(family or '')} &middot; "
            f"{html.escape(status)} &middot; {html.escape(str(entry.get('model') or slug_))}</small></h3>"
            f"{errors}<ul>{facts}</ul>"
            f"<p>Reports: {_links(entry.get('reports', []), base)}</p>"
            f"<p>Files: {files or '&mdash;'}</p></div>")


def _run_section(run: dict, base: Path) -> str:
    ts, folder = run["ts"], run["results_dir"]
    run_paths = results.RunPaths(folder, ts)
    status = run["status"] or "incomplete"
    head = (f'<section class="run" id="run-{html.escape(ts)}"><h2>Run {_when(ts)} '
            f"<small>{html.escape(ts)} &middot; {html.escape(os.path.relpath(folder, base))} "
            f"&middot; status: {html.escape(status)}</small></h2>")
    cross = [_links(run["reports"], base)] if run["reports"] else []
    if run_paths.complete_json.is_file():
        cross.append(_link(run_paths.complete_json, base, "complete JSON"))
    if run_paths.log_file.is_file():
        cross.append(_link(run_paths.log_file, base, "run log"))
    body = [f"<p>Whole run: {' '.join(cross) or '&mdash;'}</p>"]
    if run.get("comparison") and len(run["comparison"].get("models") or []) > 1:
        body.append("<ul>" + "".join(f"<li>{html.escape(s)}</li>" for s in
                                     findings.comparison(run["comparison"]).sentences) + "</ul>")
    order = run.get("order") or []
    ranked = sorted(run["models"].items(), key=lambda item: (
        order.index(item[0]) if item[0] in order else len(order), item[0]))
    body += [_model_card(slug_, m, ts, base) for slug_, m in ranked]
    return head + "\n".join(body) + "</section>"


_STYLE = ("body{font-family:sans-serif;margin:2em auto;max-width:72em;padding:0 1em;color:#1a202c}"
          "h2 small,h3 small{color:#4a5568;font-weight:normal;font-size:.7em}"
          "section.run{border-top:2px solid #cbd5e0;margin-top:2em}"
          ".model{border:1px solid #cbd5e0;border-left:4px solid #2b6cb0;padding:.5em 1em;"
          "margin:1em 0;overflow:auto;background:#f7fafc}"
          ".model.failed{border-left-color:#c53030}.model.incomplete{border-left-color:#718096}"
          ".model h3{margin:.3em 0}.thumb{float:right;margin-left:1em}"
          ".thumb img{border:1px solid #cbd5e0;max-width:260px;height:auto}"
          ".error{color:#c53030;font-weight:bold}")


def render(runs: list[dict], base: Path) -> str:
    content = "\n".join(_run_section(run, base) for run in runs) or "<p>No runs yet.</p>"
    intro = ("<p>Every run, newest first. For each model: its super weights and their verdicts "
             "(zeroed alone on a reference text, against a control of ordinary weights), what "
             "zeroing them all does to WikiText-2 perplexity, and the accuracy changes that are "
             "significant; then each stage's report (findings first, code hidden), its JSON and "
             "its log.</p>")
    return (f"<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>Super "
            f"weight analysis reports</title><style>{_STYLE}</style></head><body>\n<h1>Super "
            f"weight analysis reports</h1>\n{intro}\n{content}\n</body></html>\n")


def write_index(reports_dir: str | Path, results_dir: str | Path) -> Path:
    """Rewrite `<reports_dir>/index.html` over every registered results folder."""
    reports_dir = Path(reports_dir).expanduser().resolve()
    # Runs of other results folders may share this index: one writer at a time.
    with RunLock(reports_dir, wait=True, what="reports folder", name=INDEX_LOCK_NAME):
        runs = []
        for folder in _registered(reports_dir, Path(results_dir).expanduser().resolve()):
            runs += collect_runs(folder)
        runs.sort(key=lambda r: r["ts"], reverse=True)
        path = index_path(reports_dir)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(render(runs, reports_dir), encoding="utf-8")
        os.replace(tmp, path)
    return path
