"""The HTML index of every run's reports (`reports/index.html`).

The index lists, newest run first, each run's models with their status and links to the HTML
reports of their notebooks (in the order of the stage table). It covers every results folder
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

from . import results, stages
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
    """Every run found under a results folder: timestamp, status, models and report files."""
    runs: dict[str, dict] = {}

    def run_for(ts: str) -> dict:
        return runs.setdefault(ts, {"ts": ts, "results_dir": results_dir, "status": None,
                                    "models": {}, "reports": []})

    for page in _pages(results_dir / "reports"):
        if (m := _REPORT.match(page.name)):
            run_for(m["ts"])["reports"].append((m["stage"], page))
    for model_dir in sorted(p for p in results_dir.iterdir() if p.is_dir()):
        for page in _pages(model_dir / "reports"):
            if (m := _REPORT.match(page.name)):
                entry = run_for(m["ts"])["models"].setdefault(
                    model_dir.name, {"status": None, "model": model_dir.name, "error": None,
                                     "reports": []})
                entry["reports"].append((m["stage"], page))
    for ts, run in runs.items():
        complete = results.read_json_if_exists(results_dir / f"complete_analysis_{ts}.json")
        if not complete:
            continue
        run["status"] = complete.get("status")
        for m in complete.get("models", []):
            entry = run["models"].setdefault(m["slug"], {"reports": []})
            entry.update(status=m.get("status"), model=m.get("model"), error=m.get("error"))
    return sorted(runs.values(), key=lambda r: r["ts"], reverse=True)


def _pages(folder: Path) -> list[Path]:
    """The HTML pages of a folder in stage-table order."""
    def key(page: Path):
        m = _REPORT.match(page.name)
        return (stages.order(m["stage"]) if m else len(stages.STAGES), page.name)

    return sorted(folder.glob("*.html"), key=key)


def _when(ts: str) -> str:
    return datetime.strptime(ts, results.TIMESTAMP_FORMAT).strftime("%Y-%m-%d %H:%M:%S")


def _links(pages: list[tuple[str, Path]], base: Path) -> str:
    return " ".join(f'<a href="{html.escape(os.path.relpath(p, base))}">{html.escape(stage)}</a>'
                    for stage, p in pages) or "&mdash;"


def render(runs: list[dict], base: Path) -> str:
    rows = []
    for run in runs:
        ts, folder = run["ts"], run["results_dir"]
        complete = folder / f"complete_analysis_{ts}.json"
        head = (f'<h2>Run {html.escape(ts)} <small>{_when(ts)} &middot; '
                f'{html.escape(os.path.relpath(folder, base))} &middot; '
                f'status: {html.escape(str(run["status"] or "incomplete"))}</small></h2>')
        extra = _links(run["reports"], base)
        if complete.is_file():
            extra += f' <a href="{html.escape(os.path.relpath(complete, base))}">complete JSON</a>'
        body = [f"<p>Cross-model: {extra}</p>", "<table><tr><th>model</th><th>status</th>"
                "<th>reports</th><th>error</th></tr>"]
        for slug_, m in sorted(run["models"].items()):
            status = m.get("status") or "incomplete"
            body.append(
                f'<tr class="{html.escape(status)}"><td title="{html.escape(str(m.get("model")))}">'
                f'{html.escape(slug_)}</td><td>{html.escape(status)}</td>'
                f'<td>{_links(m.get("reports", []), base)}</td>'
                f'<td>{html.escape(m.get("error") or "")}</td></tr>')
        body.append("</table>")
        rows.append(head + "\n" + "\n".join(body))
    style = ("body{font-family:sans-serif;margin:2em;max-width:70em}table{border-collapse:collapse}"
             "td,th{border:1px solid #ccc;padding:.3em .6em;text-align:left}"
             "tr.failed td{background:#fdd}small{color:#666;font-weight:normal}")
    content = "\n".join(rows) or "<p>No runs yet.</p>"
    return (f"<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>Super weight analysis "
            f"reports</title><style>{style}</style></head><body>\n<h1>Super weight analysis "
            f"reports</h1>\n{content}\n</body></html>\n")


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
