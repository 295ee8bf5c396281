"""The HTML index of every run's reports (`reports/index.html`).

The index lists, newest run first, each run's models with their status and links to the HTML
reports of their notebooks. It covers every results folder that ever wrote to it: their paths
are kept in `runs.json` beside the index, so one index serves several result folders. Links are
relative, so a reports folder moved together with the results keeps working.
"""
from __future__ import annotations

import html
import os
import re
from datetime import datetime
from pathlib import Path

from . import results

INDEX = "index.html"
REGISTRY = "runs.json"
_REPORT = re.compile(r"^(?P<stage>.+)_(?P<ts>\d{8}_\d{6})\.html$")


def repo_root(start: Path) -> Path | None:
    """The git work tree containing `start`, if any."""
    for folder in [start, *start.parents]:
        if (folder / ".git").exists():
            return folder
    return None


def default_reports_dir(results_dir: str | Path) -> Path:
    """`<repository>/reports` when results_dir is inside a git work tree, else
    `<results_dir>/reports`."""
    results_dir = Path(results_dir).expanduser().resolve()
    root = repo_root(results_dir)
    return root / "reports" if root else results_dir / "reports"


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

    for page in sorted((results_dir / "reports").glob("*.html")):
        if (m := _REPORT.match(page.name)):
            run_for(m["ts"])["reports"].append((m["stage"], page))
    for model_dir in sorted(p for p in results_dir.iterdir() if p.is_dir()):
        for page in sorted((model_dir / "reports").glob("*.html")):
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
    reports_dir.mkdir(parents=True, exist_ok=True)
    runs = []
    for folder in _registered(reports_dir, Path(results_dir).expanduser().resolve()):
        runs += collect_runs(folder)
    runs.sort(key=lambda r: r["ts"], reverse=True)
    path = index_path(reports_dir)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(render(runs, reports_dir), encoding="utf-8")
    os.replace(tmp, path)
    return path
