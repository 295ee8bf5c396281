"""Shared fixtures: the real default model (session-wide) and tiny random models; every cache
in a temporary folder; a per-test timeout."""
from __future__ import annotations

import os
import shutil
import signal
import tempfile

import pytest

# The tests never write to the user's home: the library's model and evaluation caches
# (SW_CACHE_DIR) and the caches of the tools under it go to one temporary folder, set before
# anything is imported so notebook kernels (child processes) inherit it too. The real model
# is then dequantized once per session (~20 s).
_SCRATCH = tempfile.mkdtemp(prefix="sw-lib-tests-")
for _name, _sub in {"SW_CACHE_DIR": "sw_lib", "MPLCONFIGDIR": "matplotlib", "HF_HOME": "hf",
                    "IPYTHONDIR": "ipython", "JUPYTER_RUNTIME_DIR": "jupyter-runtime",
                    "XDG_CACHE_HOME": "xdg-cache"}.items():
    os.environ[_name] = os.path.join(_SCRATCH, _sub)

# `make test` runs one pytest-xdist worker per core: each worker, and the notebook kernels and
# command lines it starts, gets its share of the cores, so the workers never oversubscribe them.
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if _WORKERS > 1:
    os.environ["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // _WORKERS))

import torch  # noqa: E402 -- after the environment above

from sw_lib import models  # noqa: E402

import tiny  # noqa: E402

# Per-test limits (seconds) for setup + call + teardown; @pytest.mark.timeout(N) overrides.
TIMEOUT = 300
SLOW_TIMEOUT = 1200


def pytest_sessionfinish(session, exitstatus):
    shutil.rmtree(_SCRATCH, ignore_errors=True)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    """Fail a test that runs past its limit (SIGALRM in the main thread) instead of hanging
    the suite; module fixtures set up by this test count towards it."""
    marker = item.get_closest_marker("timeout")
    seconds = (marker.args[0] if marker else
               SLOW_TIMEOUT if item.get_closest_marker("slow") else TIMEOUT)

    def expire(signum, frame):
        raise TimeoutError(f"{item.nodeid} ran past its {seconds} s limit (tests/conftest.py)")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(int(seconds))
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


@pytest.fixture(scope="session")
def tokenizer():
    return models.load_tokenizer()


@pytest.fixture(scope="session")
def smol():
    """The real SmolLM2-135M-Instruct (dequantized GGUF, cached as safetensors)."""
    return models.load_model("smollm2-135m", dtype="float32", device="cpu")


@pytest.fixture(scope="session")
def prompt_ids(tokenizer):
    return tokenizer("Apple Inc. is a worldwide tech company.", return_tensors="pt").input_ids


def make_tiny(model_type: str, tokenizer, seed: int = 0, **overrides) -> models.LoadedModel:
    model = tiny.tiny_model(model_type, vocab_size=len(tokenizer), seed=seed, **overrides)
    return models.from_model(model, tokenizer, name=f"tiny-{model_type}")


def weights_snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_bit_identical(model: torch.nn.Module, snapshot: dict[str, torch.Tensor]) -> None:
    for name, tensor in model.state_dict().items():
        before = snapshot[name]
        assert torch.equal(tensor.view(torch.uint8) if tensor.dtype.is_floating_point else tensor,
                           before.view(torch.uint8) if before.dtype.is_floating_point else before), name


@pytest.fixture(autouse=True)
def _one_thread_for_tiny_models(request):
    """Tiny models run faster on one intra-op thread (no OpenMP hand-offs); the real model,
    in tests marked slow, keeps every core (its worker's share of them under pytest-xdist)."""
    if request.node.get_closest_marker("slow"):
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
