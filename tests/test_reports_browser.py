"""The reports as a reader gets them, in a real browser: headless Chromium opens the index and
one stage report of a tiny-model run, from disk and over HTTP (a server this test starts on
127.0.0.1 and stops). The page renders (a screenshot that is not blank), every link and image
resolves, the findings block is visible in the first screen, code is hidden until asked for.

Chromium is Debian's `chromium` package (.ci/run installs it). Under CI (CI=true) the test must
run; elsewhere, without a browser, it is skipped and says why.
"""
from __future__ import annotations

import functools
import http.server
import os
import threading
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

from sw_lib import cli, results

import tiny
from browser import Browser, find_chromium

PLANTED = (1, 7, 11)
SHOTS = os.environ.get("SW_BROWSER_SHOTS")  # a folder to keep the screenshots in


def _chromium() -> str:
    binary = find_chromium()
    if binary:
        return binary
    reason = ("headless Chromium not found: install Debian's chromium package "
              "(apt-get install chromium) to run the report browser test")
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"CI must run the browser test: {reason}")
    pytest.skip(reason)


@pytest.fixture(scope="module")
def run(tmp_path_factory, tokenizer, prompt_ids):
    """sw-analyze over one tiny model with a planted weight (verdict contributor, ablated with
    --include-contributors), its reports and index in a folder of its own. The tests ask for
    `browser` first, so a machine without Chromium skips before this run."""
    root = tmp_path_factory.mktemp("browser")
    model = tiny.tiny_model("llama", vocab_size=len(tokenizer), seed=1)
    tiny.plant_super_weight(model, *PLANTED, prompt_ids)
    spec = str(tiny.save_tiny(model, tokenizer, root / "models" / "tiny-llama"))
    with pytest.MonkeyPatch.context() as env:
        env.setenv("OMP_NUM_THREADS", "1")
        code = cli.main(["--models", spec, "--results-dir", str(root / "results"),
                         "--reports-dir", str(root / "reports"), "--cache-dir", str(root / "cache"),
                         "--perplexity-samples", "1", "--seq-len", "32", "--accuracy-samples", "2",
                         "--accuracy-tasks", "arc_easy", "--max-iterations", "3",
                         "--reference-tokens", "64", "--include-contributors",
                         "--device", "cpu", "--dtype", "float32", "-q"])
    assert code == 0
    return root, results.latest_timestamp(root / "results")


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    b = Browser(_chromium(), tmp_path_factory.mktemp("chromium-profile"))
    yield b
    b.close()


@pytest.fixture(scope="module")
def server(run):
    """A static HTTP server on 127.0.0.1 (a free port) over the run's folder."""
    root, _ = run
    handler = functools.partial(_QuietHandler, directory=str(root))
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()
    thread.join()


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


def _not_blank(path: Path) -> None:
    """Many colours, and the background (the commonest colour) covers under 98% of it."""
    from PIL import Image

    image = Image.open(path).convert("RGB")
    colours = image.getcolors(maxcolors=1 << 24)
    background = max(colours)[0] / (image.width * image.height)
    assert len(colours) > 20 and background < 0.98, f"{path.name}: the page looks blank"


def _resolves(url: str) -> bool:
    parsed = urllib.parse.urlparse(url)
    if parsed.scheme == "file":
        return Path(urllib.parse.unquote(parsed.path)).is_file()
    with urllib.request.urlopen(url, timeout=10) as reply:  # noqa: S310 -- our own server
        return reply.status == 200 and len(reply.read()) > 0


def _check_links(browser: Browser) -> list[str]:
    links = browser.evaluate("Array.from(document.querySelectorAll('a[href]')).map(a => a.href)")
    images = browser.evaluate(
        "Array.from(document.images).map(i => [i.src, i.complete && i.naturalWidth > 0])")
    targets = [u.split("#")[0] for u in links if not u.startswith("data:")]
    broken = [u for u in targets if not _resolves(u)]
    broken += [src[:80] for src, loaded in images if not loaded]
    assert broken == [], broken
    return targets


def _shot(browser: Browser, tmp_path: Path, name: str) -> Path:
    folder = Path(SHOTS) if SHOTS else tmp_path
    folder.mkdir(parents=True, exist_ok=True)
    path = browser.screenshot(folder / name)
    _not_blank(path)
    return path


@pytest.mark.parametrize("over", ["disk", "http"])
def test_index_renders_with_findings_thumbnail_and_working_links(browser, run, server, over,
                                                                 tmp_path):
    root, ts = run
    index = root / "reports" / "index.html"
    browser.open(index.as_uri() if over == "disk" else f"{server}/reports/index.html")
    _shot(browser, tmp_path, f"index-{over}.png")
    card = browser.evaluate(
        "(() => { const c = document.querySelector('.model'); const r = c.getBoundingClientRect();"
        " return {text: c.innerText, top: r.top, height: r.height,"
        " inner: window.innerHeight}; })()")
    assert 0 < card["height"] and card["top"] < card["inner"]  # in the first screen
    assert "L1 [7, 11]" in card["text"] and "contributor" in card["text"]
    assert "perplexity" in card["text"]
    targets = _check_links(browser)
    names = [t.rsplit("/", 1)[-1] for t in targets]
    for stage in ("01_detection", "02_individual_ablation", "03_combined_ablation",
                  "05_cross_model_comparison"):
        assert f"{stage}_{ts}.html" in names
    assert f"analysis_{ts}.json" in names and f"analysis_{ts}.log" in names
    assert browser.evaluate("document.querySelectorAll('img').length") >= 1  # the thumbnail


@pytest.mark.parametrize("over", ["disk", "http"])
def test_report_opens_with_findings_and_hides_code_until_asked(browser, run, server, over,
                                                               tmp_path):
    root, ts = run
    page = results.ModelPaths(root / "results" / "tiny-llama", ts).report("01_detection")
    url = (page.as_uri() if over == "disk" else
           f"{server}/{page.relative_to(root).as_posix()}")
    browser.open(url)
    _shot(browser, tmp_path, f"report-{over}.png")
    findings = browser.evaluate(
        "(() => { const f = document.querySelector('.sw-findings'); const r = f.getBoundingClientRect();"
        " return {text: f.innerText, top: r.top, height: r.height, inner: window.innerHeight,"
        " visible: getComputedStyle(f).display !== 'none'}; })()")
    assert findings["visible"] and findings["height"] > 0 and findings["top"] < findings["inner"]
    assert "L1 [7, 11]" in findings["text"] and "contributor" in findings["text"]
    hidden = ("Array.from(document.querySelectorAll('.jp-CodeCell .jp-Cell-inputWrapper'))"
              ".map(e => e.offsetParent === null)")
    before = browser.evaluate(hidden)
    assert before and all(before)  # every code input hidden
    browser.evaluate("document.getElementById('sw-toggle-code').click()")
    after = browser.evaluate(hidden)
    assert any(not h for h in after)  # shown once asked for
    assert browser.evaluate("document.getElementById('sw-toggle-code').textContent") == "Hide code"
    browser.evaluate("document.getElementById('sw-toggle-code').click()")
    assert all(browser.evaluate(hidden))
    targets = _check_links(browser)
    assert any(t.endswith(f"01_detection_{ts}.ipynb") for t in targets)  # the notebook beside it
    figures = browser.evaluate("Array.from(document.images).filter(i => i.src.startsWith("
                               "'data:image/png') && i.naturalWidth > 0).length")
    assert figures >= 2  # embedded figures
