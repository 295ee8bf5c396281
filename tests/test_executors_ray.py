"""The Ray executor on a real two-node Ray cluster on this machine (a head and a worker, both
started with `ray start` on 127.0.0.1, one CPU each, no dashboard, stopped at the end).

The stand-in notebooks of tests/test_pipeline.py keep the stages to seconds; what is tested
is the executor: two models analysed in parallel give the JSON of a serial run, and a worker
node killed mid-run fails only its model, which --resume then completes.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import nbformat
import psutil
import pytest

from sw_lib import config, executors, pipeline, results

pytest.importorskip("ray")
from test_pipeline import REPO, stand_in_notebooks, tiny_folder  # noqa: E402

RAY = str(Path(sys.executable).with_name("ray"))
# 01 waits, when the cluster was started with SW_TEST_HOLD, until the test says go: both models
# are then running, one on each node, when the test kills the worker node.
HOLD = '''import os, time
from pathlib import Path
_hold = os.environ.get("SW_TEST_HOLD")
if _hold and Path(_hold).is_dir() and not Path(_hold, "go").exists():
    Path(_hold, Path(output_dir).name + ".pid").write_text(str(os.getpid()))
    for _ in range(1800):
        if Path(_hold, "go").exists():
            break
        time.sleep(0.1)
'''


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _raylets() -> set[int]:
    return {p.pid for p in psutil.process_iter(["name"]) if p.info["name"] == "raylet"}


def _ray(*args: str, env: dict) -> None:
    done = subprocess.run([RAY, *args], env=env, timeout=120, capture_output=True, text=True)
    assert done.returncode == 0, f"ray {' '.join(args)} failed:\n{done.stdout}\n{done.stderr}"


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """A head and one worker node; yields (address, the worker node's raylet pid, hold folder)."""
    root = tmp_path_factory.mktemp("ray")
    hold = root / "hold"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "tests")]),
           "SW_TEST_HOLD": str(hold), "RAY_USAGE_STATS_ENABLED": "0",
           # a lost node is noticed in seconds, not the default half minute
           "RAY_health_check_initial_delay_ms": "0", "RAY_health_check_period_ms": "500",
           "RAY_health_check_timeout_ms": "500", "RAY_health_check_failure_threshold": "3"}
    address = f"127.0.0.1:{_free_port()}"
    common = ["--num-cpus", "1", "--num-gpus", "0", "--node-ip-address", "127.0.0.1",
              "--disable-usage-stats"]
    # Ray's sockets live under --temp-dir, and a Unix socket path holds at most 107 bytes:
    # pytest's temporary folders (deeper under pytest-xdist) are too long for it.
    temp = tempfile.mkdtemp(prefix="ray", dir="/tmp")
    try:
        _ray("start", "--head", "--port", address.split(":")[1], "--include-dashboard=false",
             "--temp-dir", temp, *common, env=env)
        head = _raylets()
        _ray("start", "--address", address, *common, env=env)
        worker = _raylets() - head
        assert len(worker) == 1, (head, worker)
        yield address, worker.pop(), hold
    finally:
        subprocess.run([RAY, "stop", "--force"], env=env, timeout=120, capture_output=True)
        shutil.rmtree(temp, ignore_errors=True)


def _config(tmp_path: Path, results_dir: Path, **runtime) -> dict:
    folders = [tiny_folder(tmp_path / "m" / name, family)
               for name, family in (("alpha", "llama"), ("beta", "qwen2"))]
    overrides = {"models": folders, "results_dir": str(results_dir),
                 "runtime.stage_timeout": 300.0}
    overrides.update({f"runtime.{k}": v for k, v in runtime.items()})
    return config.load(overrides=overrides)


def _normalised(path: Path, result) -> dict:
    """A run's JSON with what differs between two runs of the same work taken out: its
    timestamp and folder, times (seconds, updated), memory (which stage peaked is a race
    between stages of similar size), and the executor fields of the recorded config."""
    text = path.read_text().replace(result.ts, "TS").replace(str(result.results_dir), "DIR")

    def strip(node):
        if isinstance(node, dict):
            return {k: strip(v) for k, v in node.items()
                    if k not in ("seconds", "peak_memory_mib", "peak_memory", "mib", "created", "started",
                                 "finished", "updated", "executor", "ray_address", "versions")}
        if isinstance(node, list):
            return [strip(v) for v in node]
        return node
    return strip(json.loads(text))


def _documents(result) -> dict[str, dict]:
    return {str(p.relative_to(result.results_dir)).replace(result.ts, "TS"): _normalised(p, result)
            for p in sorted(result.results_dir.rglob("*.json"))}


@pytest.mark.slow
@pytest.mark.timeout(420)
def test_two_nodes_analyse_two_models_like_a_serial_run(cluster, tmp_path):
    address, _, _ = cluster
    notebooks = stand_in_notebooks(tmp_path / "notebooks")
    options = pipeline.Options(notebooks_dir=notebooks, html=False)

    start = time.perf_counter()
    serial = pipeline.run(_config(tmp_path, tmp_path / "serial"), options)
    serial_seconds = time.perf_counter() - start
    start = time.perf_counter()
    cfg = _config(tmp_path, tmp_path / "ray", executor="ray", ray_address=address)
    parallel = pipeline.run(cfg, options)
    ray_seconds = time.perf_counter() - start
    print(f"two tiny models, stand-in notebooks: serial {serial_seconds:.1f} s, "
          f"two-node Ray {ray_seconds:.1f} s")

    assert serial.ok and parallel.ok, (serial.failures, parallel.failures)
    serial_docs, ray_docs = _documents(serial), _documents(parallel)
    assert {"alpha/data/analysis_TS.json", "beta/data/analysis_TS.json",
            "complete_analysis_TS.json"} <= set(ray_docs)
    for name in serial_docs:
        assert json.dumps(ray_docs[name], indent=1, sort_keys=True) == \
            json.dumps(serial_docs[name], indent=1, sort_keys=True), name
    assert ray_docs.keys() == serial_docs.keys()
    complete = results.read_json(parallel.complete_json)
    assert complete["config"]["runtime"]["executor"] == "ray"
    assert [m["model"] for m in complete["comparison"]["models"]] == cfg["models"]


def _kernel_pids(hold: Path, names: list[str]) -> dict[str, int]:
    for _ in range(1200):  # both models' detection started (two minutes at most)
        files = {n: hold / f"{n}.pid" for n in names}
        if all(f.is_file() and f.read_text() for f in files.values()):
            return {n: int(f.read_text()) for n, f in files.items()}
        time.sleep(0.1)
    raise AssertionError(f"the models' detection did not start: {sorted(os.listdir(hold))}")


def _kill_node(raylet: int) -> None:
    node = psutil.Process(raylet)
    for process in [*node.children(recursive=True), node]:
        try:
            process.kill()
        except psutil.NoSuchProcess:
            pass


@pytest.mark.slow
@pytest.mark.timeout(420)
def test_a_lost_worker_node_fails_its_model_only_and_resume_completes_it(cluster, tmp_path):
    address, worker_raylet, hold = cluster
    notebooks = stand_in_notebooks(tmp_path / "notebooks")
    detection = nbformat.read(str(notebooks / "01_detection.ipynb"), as_version=4)
    detection.cells.insert(1, nbformat.v4.new_code_cell(HOLD))
    nbformat.write(detection, str(notebooks / "01_detection.ipynb"))
    cfg = _config(tmp_path, tmp_path / "results", executor="ray", ray_address=address)
    hold.mkdir()

    # The test kills the worker node once both models hold in 01, from a second thread,
    # since pipeline.run waits for the cluster in this one.
    import threading
    lost: dict[str, str] = {}

    def kill_worker_then_go():
        try:
            for name, pid in _kernel_pids(hold, ["alpha", "beta"]).items():
                if worker_raylet in {p.pid for p in psutil.Process(pid).parents()}:
                    lost["model"] = name
            _kill_node(worker_raylet)
        finally:
            (hold / "go").write_text("")

    killer = threading.Thread(target=kill_worker_then_go, daemon=True)
    killer.start()
    first = pipeline.run(cfg, pipeline.Options(notebooks_dir=notebooks, html=False))
    killer.join(timeout=60)
    assert lost, "neither model ran on the worker node"
    dead, alive = lost["model"], ({"alpha", "beta"} - {lost["model"]}).pop()
    spec = {"alpha": cfg["models"][0], "beta": cfg["models"][1]}

    failed = [line for line in first.failures if not line.startswith("05_")]
    assert failed and all(line.startswith(f"{spec[dead]}: ") for line in failed), first.failures
    assert all("ray task lost" in line for line in failed)
    dead_stages = results.read_json(
        results.ModelPaths(first.results_dir / dead, first.ts).analysis_json)["stages"]
    assert dead_stages["resolve"]["status"] == "ok"  # checked by the driver, before
    assert [dead_stages[s]["status"] for s in results.MODEL_STAGES[:3]] == ["failed"] * 3
    alive_stages = results.read_json(
        results.ModelPaths(first.results_dir / alive, first.ts).analysis_json)["stages"]
    assert [alive_stages[s]["status"] for s in results.MODEL_STAGES[:3]] == ["ok"] * 3

    # --resume on what is left of the cluster (the head): only the lost model's stages run.
    second = pipeline.run(cfg, pipeline.Options(notebooks_dir=notebooks, html=False,
                                                resume=True))
    assert second.ok and second.ts == first.ts, second.failures
    stages = {name: results.read_json(results.ModelPaths(
        second.results_dir / name, second.ts).analysis_json)["stages"] for name in spec}
    assert all(stages[alive][s].get("reused") for s in results.MODEL_STAGES[:3])
    assert not any(stages[dead][s].get("reused") for s in results.MODEL_STAGES[:3])
    assert [stages[dead][s]["status"] for s in results.MODEL_STAGES[:3]] == ["ok"] * 3


def test_no_cluster_at_the_address_is_one_line_before_any_work(tmp_path):
    runtime = {"executor": "ray", "ray_address": f"127.0.0.1:{_free_port()}",
               "ray_num_cpus": 1.0, "ray_num_gpus": None, "device": "cpu"}
    with pytest.raises(executors.ExecutorError) as err:
        executors.from_config(runtime)
    message = str(err.value)
    assert "\n" not in message and re.search(r"no Ray cluster at '127\.0\.0\.1:\d+'", message)


def test_a_model_asks_for_a_gpu_only_when_it_runs_on_cuda():
    assert executors.gpus_per_model("cuda:1", None, cluster_gpus=0) == 1
    assert executors.gpus_per_model("auto", None, cluster_gpus=8) == 1
    assert executors.gpus_per_model("auto", None, cluster_gpus=0) == 0
    assert executors.gpus_per_model("cpu", None, cluster_gpus=8) == 0
    assert executors.gpus_per_model("cuda", 0.5, cluster_gpus=8) == 0.5
