"""Shared fixtures: the real default model (session-wide) and tiny random models."""
from __future__ import annotations

import pytest
import torch

from sw_lib import models, tiny


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
    in tests marked slow, keeps every core."""
    if request.node.get_closest_marker("slow"):
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
