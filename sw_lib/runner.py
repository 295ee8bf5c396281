"""Run one notebook with papermill in its own kernel, watch it, and export it to HTML.

`execute` gives a notebook only the parameters its `parameters` cell declares, watches the
kernel process while it runs (peak memory; a stage timeout kills a stuck kernel, so its stage
fails and the run goes on), and returns the stage record: status, one-line error, seconds,
outputs (files new or changed under the watched folder), peak memory.
"""
from __future__ import annotations

import hashlib
import logging
import os
import re
import resource
import signal
import threading
import time
from datetime import datetime
from pathlib import Path

from . import results

log = logging.getLogger("sw_lib.runner")

_SKIP_DIRS = {"notebooks", "reports", "logs"}  # the pipeline's own files, not a stage's outputs
_SAMPLE_SECONDS = 0.2


class StageTimeout(RuntimeError):
    """The notebook ran past its stage timeout and its kernel was stopped."""


# --- what a notebook declares ---------------------------------------------------------------


def parameters_cell(notebook: Path):
    """The cell tagged `parameters`, or None."""
    import nbformat

    nb = nbformat.read(str(notebook), as_version=4)
    return next((c for c in nb.cells if c.cell_type == "code"
                 and "parameters" in c.metadata.get("tags", [])), None)


def declared_parameters(notebook: Path) -> list[str]:
    """Names assigned in the notebook's `parameters` cell.

    Read with Python's own parser: papermill's `inspect_notebook` silently drops a line whose
    comment contains `=` (e.g. `ratio = 1.02  # loss >= this`); it is the fallback for a cell
    that is not plain Python.
    """
    import ast

    cell = parameters_cell(notebook)
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


def notebook_hash(notebook: Path) -> str:
    """sha256 of the notebook file: a stage whose notebook changed is rerun on --resume."""
    return hashlib.sha256(Path(notebook).read_bytes()).hexdigest()


# --- watching the kernel --------------------------------------------------------------------


class _Watch:
    """Samples the kernel's memory (with its children) and stops it past `timeout` seconds."""

    def __init__(self, timeout: float | None):
        self.timeout = timeout
        self.pid: int | None = None  # set by the kernel manager once the kernel runs
        self.peak = 0
        self.timed_out = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._children_before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss

    def __enter__(self):
        self.start = time.monotonic()
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.kill()  # never leave a kernel behind (interrupts, errors)
        # A kernel reaped by now counts in RUSAGE_CHILDREN (KiB on Linux): exact when it rose.
        after = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
        if after > self._children_before:
            self.peak = max(self.peak, after * 1024)

    def _loop(self) -> None:
        import psutil

        while not self._stop.wait(_SAMPLE_SECONDS):
            if self.pid is None:
                continue
            try:
                kernel = psutil.Process(self.pid)
                rss = kernel.memory_info().rss + sum(
                    c.memory_info().rss for c in kernel.children(recursive=True))
                self.peak = max(self.peak, rss)
            except psutil.Error:
                pass  # the kernel is starting or has ended
            if self.timeout and time.monotonic() - self.start > self.timeout:
                self.timed_out = True
                self.kill()
                return

    def kill(self) -> None:
        if self.pid is None:
            return
        try:
            os.kill(self.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass

    @property
    def peak_mib(self) -> float | None:
        return round(self.peak / 2**20, 1) if self.peak else None


def _kernel_manager_class(log_file: Path | None, watch: _Watch):
    """A kernel manager that tells `watch` its kernel's pid and, with `log_file`, sends the
    kernel process's own stdout/stderr (start-up warnings, crashes) there instead of the
    console; the notebook's outputs are unaffected."""
    from jupyter_client import AsyncKernelManager

    class _WatchedKernelManager(AsyncKernelManager):
        async def start_kernel(self, **kw):
            stream = open(log_file, "a", encoding="utf-8") if log_file else None  # noqa: SIM115
            if stream is not None:
                kw.setdefault("stdout", stream)
                kw.setdefault("stderr", stream)
            try:
                result = await super().start_kernel(**kw)
            finally:
                if stream is not None:
                    stream.close()  # the child keeps its own copy of the descriptor
            watch.pid = getattr(self.provisioner, "pid", None)
            return result

    return _WatchedKernelManager


# --- one notebook ----------------------------------------------------------------------------


def error_line(err: BaseException) -> str:
    from papermill.exceptions import PapermillExecutionError

    if isinstance(err, PapermillExecutionError):
        text = f"{err.ename}: {err.evalue}"
    else:
        text = f"{type(err).__name__}: {err}"
    line = (text.strip().splitlines() or [type(err).__name__])[0]
    return line if len(line) <= 500 else line[:497] + "..."


def snapshot(root: Path) -> dict[Path, int]:
    """mtime of every result file under root (not notebooks/reports/logs)."""
    out = {}
    if not root.is_dir():
        return out
    for path in root.rglob("*"):
        rel = path.relative_to(root)
        if path.is_file() and rel.parts[0] not in _SKIP_DIRS and not path.name.endswith(".tmp"):
            out[path] = path.stat().st_mtime_ns
    return out


def execute(notebook: Path, out_notebook: Path, report: Path | None, available: dict,
            watch: Path, kernel_name: str = "python3", log_file: Path | None = None,
            timeout: float | None = None) -> dict:
    """Run one notebook with the parameters it declares; return its stage record.

    `watch` is the folder whose new or changed files become the stage's `outputs`;
    `log_file` receives the kernel process's own output; `timeout` (seconds, None: none)
    bounds the whole notebook.
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
    record["notebook_sha256"] = notebook_hash(notebook)
    before = snapshot(watch)
    status, error = "ok", None
    out_notebook.parent.mkdir(parents=True, exist_ok=True)
    with _Watch(timeout) as kernel:
        try:
            papermill.execute_notebook(
                str(notebook), str(out_notebook), parameters=parameters,
                kernel_name=kernel_name, progress_bar=False, log_output=False,
                cwd=str(notebook.parent), kernel_manager_class=_kernel_manager_class(log_file, kernel),
                shutdown_kernel="immediate")  # outputs are saved by then
        except KeyboardInterrupt:
            raise
        except Exception as err:  # noqa: BLE001 -- any failure is recorded, the run goes on
            if getattr(err, "ename", None) == "KeyboardInterrupt":  # Ctrl-C reached the kernel
                raise KeyboardInterrupt from err
            status, error = "failed", error_line(err)
            if kernel.timed_out:
                error = (f"StageTimeout: stopped after {timeout:g} s (runtime.stage_timeout); "
                         f"raise it or set it to null")
            log.debug("%s failed", notebook.name, exc_info=True)
    after = snapshot(watch)
    record["outputs"] = sorted(str(p.relative_to(watch)) for p, m in after.items()
                               if before.get(p) != m)
    record["peak_memory_mib"] = kernel.peak_mib
    if report is not None and out_notebook.is_file():
        try:
            record["report"] = str(export_html(out_notebook, report, error))
        except Exception as err:  # noqa: BLE001
            log.warning("HTML export of %s failed: %s", out_notebook.name, error_line(err))
    return results.stage_record(status, error, round(time.perf_counter() - start, 3), **record)


# --- HTML export -------------------------------------------------------------------------------

FINDINGS_TAG = "findings"  # the cell whose output opens the report

# nbconvert's lab template, for readers: no script fetched from the network (the page is one
# file that works offline), code and the kernel's stderr (progress bars, warnings) hidden
# until "Show code" is pressed, and a line that links the executed notebook beside it.
_REPORT_TEMPLATE = """{%- extends 'index.html.j2' -%}
{%- block html_head_js_requirejs -%}{%- endblock html_head_js_requirejs -%}
{%- block html_head_js_mathjax -%}{%- endblock html_head_js_mathjax -%}
{%- block html_head_js_mermaidjs -%}{%- endblock html_head_js_mermaidjs -%}
{%- block jupyter_widgets -%}{%- endblock jupyter_widgets -%}
{% block extra_css %}
<style type="text/css">
body.sw-code-hidden .jp-CodeCell .jp-Cell-inputWrapper,
body.sw-code-hidden .jp-OutputPrompt,
body.sw-code-hidden .jp-OutputArea-output[data-mime-type="application/vnd.jupyter.stderr"],
body.sw-code-hidden .jp-CodeCell.jp-mod-noOutputs { display: none; }
#sw-report-bar { position: sticky; top: 0; z-index: 10; background: #edf2f7;
  border-bottom: 1px solid #cbd5e0; padding: .4em 1em; font-family: sans-serif; font-size: 14px; }
#sw-report-bar button { margin-right: 1em; }
#sw-report-bar a { color: #2b6cb0; text-decoration: underline; }
.sw-findings table { border-collapse: collapse; }
.sw-findings td, .sw-findings th { border: 1px solid #cbd5e0; padding: .2em .5em; text-align: left; }
</style>
{% endblock extra_css %}
{%- block body_header -%}
<body class="jp-Notebook sw-code-hidden" data-jp-theme-light="true" data-jp-theme-name="JupyterLab Light">
<div id="sw-report-bar"><button id="sw-toggle-code" type="button" aria-pressed="false"
onclick="var h=document.body.classList.toggle('sw-code-hidden');
this.textContent=h?'Show code':'Hide code';this.setAttribute('aria-pressed',String(!h));">Show code</button>
Code is hidden; {{ resources.sw_notebook_link }}</div>
<main>
{%- endblock body_header -%}
"""


def reader_order(nb) -> None:
    """Move the cells tagged `findings` right under the notebook's title (the first line of
    its first markdown cell; the rest of that cell's introduction follows them), so a report
    opens with what the stage found."""
    import nbformat

    findings = [c for c in nb.cells if FINDINGS_TAG in c.metadata.get("tags", [])]
    if not findings:
        return
    rest = [c for c in nb.cells if c not in findings]
    at = next((i for i, c in enumerate(rest) if c.cell_type == "markdown"), None)
    if at is None:
        nb.cells = findings + rest
        return
    title, _, intro = rest[at].source.partition("\n")
    head = [nbformat.v4.new_markdown_cell(title)] if title.startswith("#") and intro.strip() else []
    if head:
        rest[at] = nbformat.v4.new_markdown_cell(intro.strip())
        nb.cells = rest[:at] + head + findings + rest[at:]
    else:
        nb.cells = rest[:at + 1] + findings + rest[at + 1:]


def _failure_cell(nb, error: str):
    """A cell that says, at the top, that the stage failed and why."""
    import nbformat

    from . import findings

    block = findings.failed(nb.metadata.get("sw_stage", "this stage"), error)
    cell = nbformat.v4.new_code_cell(source="", outputs=[nbformat.v4.new_output(
        "display_data", data={"text/html": findings.to_html(block),
                              "text/plain": findings.to_text(block)})])
    cell.metadata["tags"] = [FINDINGS_TAG]
    return cell


def export_html(notebook: Path, html: Path, error: str | None = None) -> Path:
    """Export an executed notebook to a self-contained HTML page for readers: findings first,
    figures embedded (base64 PNG), code hidden behind a button, a link to the notebook.

    `error`: the stage's one-line error; the page then opens with it.
    """
    import html as html_text

    import jinja2
    import nbformat
    from nbconvert import HTMLExporter

    nb = nbformat.read(str(notebook), as_version=4)
    nb.metadata["sw_stage"] = re.sub(r"_\d{8}_\d{6}$", "", notebook.stem)  # without the run's ts
    if error:
        nb.cells.append(_failure_cell(nb, error))
    reader_order(nb)
    exporter = HTMLExporter(embed_images=True, template_name="lab",
                            extra_loaders=[jinja2.DictLoader({"sw_report.html.j2": _REPORT_TEMPLATE})])
    exporter.template_file = "sw_report.html.j2"
    link = os.path.relpath(notebook, html.parent)
    body, _ = exporter.from_notebook_node(nb, resources={
        "metadata": {"name": notebook.stem, "path": str(notebook.parent)},
        "sw_notebook_link": f'every cell is in the executed notebook <a href="{html_text.escape(link)}">'
                            f"{html_text.escape(notebook.name)}</a>."})
    html.parent.mkdir(parents=True, exist_ok=True)
    tmp = html.with_name(html.name + ".tmp")
    tmp.write_text(body, encoding="utf-8")
    os.replace(tmp, html)
    return html
