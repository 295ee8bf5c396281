"""The test suite's own guards: caches outside the user's home, and a per-test timeout."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

TESTS = Path(__file__).resolve().parent


def test_caches_go_to_a_temporary_folder_not_home():
    """conftest sets SW_CACHE_DIR (and the tools' cache folders) before anything is imported;
    the model cache and the evaluation cache both live under it."""
    from sw_lib import evaluate, models

    home = Path.home().resolve()
    root = Path(os.environ["SW_CACHE_DIR"]).resolve()
    assert not root.is_relative_to(home)
    assert models.cache_root().resolve() == root
    assert evaluate.EvalCache.default().root.resolve() == root / "eval"
    for name in ("MPLCONFIGDIR", "HF_HOME", "IPYTHONDIR", "JUPYTER_RUNTIME_DIR", "XDG_CACHE_HOME"):
        assert not Path(os.environ[name]).resolve().is_relative_to(home), name


def test_a_test_past_its_limit_fails_instead_of_hanging(tmp_path):
    """The conftest hook, in a separate pytest run: a stuck test fails at its limit."""
    (tmp_path / "conftest.py").write_text(
        "import importlib.util\n"
        f"spec = importlib.util.spec_from_file_location('suite', {str(TESTS / 'conftest.py')!r})\n"
        "suite = importlib.util.module_from_spec(spec)\n"
        "spec.loader.exec_module(suite)\n"
        "pytest_runtest_protocol = suite.pytest_runtest_protocol\n"
        "pytest_sessionfinish = suite.pytest_sessionfinish\n")
    (tmp_path / "test_stuck.py").write_text(
        "import time\nimport pytest\n\n"
        "@pytest.mark.timeout(3)\ndef test_stuck():\n    time.sleep(120)\n\n"
        "def test_quick():\n    assert True\n")
    out = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                          str(tmp_path)], capture_output=True, text=True, timeout=110,
                         cwd=tmp_path, env={**os.environ,
                              "PYTHONPATH": os.pathsep.join([str(TESTS.parent), str(TESTS)])})
    assert out.returncode == 1, out.stdout + out.stderr
    assert "TimeoutError: test_stuck.py::test_stuck ran past its 3 s limit" in out.stdout
    assert "1 failed, 1 passed" in out.stdout
