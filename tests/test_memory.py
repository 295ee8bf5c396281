"""The memory estimate before loading: exact parameter counts from safetensors headers and the
config's sizes, and a model too large for a limit refused in one line before any weight loads."""
from __future__ import annotations

import pytest
import torch

from sw_lib import memory, models

import tiny


@pytest.mark.parametrize("model_type", ["llama", "qwen2", "mixtral"])
def test_parameter_counts_equal_the_built_models(tmp_path, model_type):
    model = tiny.tiny_model(model_type, vocab_size=128)
    built = sum(p.numel() for p in model.parameters())
    assert memory.config_parameters(model.config) == built
    model.save_pretrained(tmp_path)
    assert memory.safetensors_parameters(tmp_path) == built


def test_estimate_is_weights_in_the_dtype_plus_activations(tmp_path):
    model = tiny.tiny_model("llama", vocab_size=128)
    model.save_pretrained(tmp_path)
    count = sum(p.numel() for p in model.parameters())
    est = memory.estimate(model.config, "bfloat16", 100, tmp_path)
    assert est.source == "safetensors headers" and est.weights_bytes == 2 * count
    c = model.config
    per_token = 4 * c.vocab_size + 2 * (4 * c.hidden_size + 3 * c.intermediate_size)
    assert est.activations_bytes == 100 * per_token
    assert est.total_bytes == 2 * count + 100 * per_token
    # the token budget that spends half of the free memory on activations, at least the floor
    assert memory.token_budget_for(10 * per_token, c, "bfloat16", floor=1) == 5
    assert memory.token_budget_for(10 * per_token, c, "bfloat16", floor=64) == 64
    assert memory.token_budget_for(1000 * per_token, c, "bfloat16", floor=1) == 500


def test_a_model_too_large_for_the_limit_is_refused_in_one_line(tmp_path, tokenizer):
    folder = tmp_path / "m"
    tiny.tiny_model("llama", vocab_size=128).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    needed = memory.estimate(tiny.tiny_model("llama", vocab_size=128).config, "float32", 64,
                             folder).total_bytes
    with pytest.raises(memory.NotEnoughMemory) as err:
        models.load_model(str(folder), dtype="float32", device="cpu",
                          memory_limit=needed - 1, token_budget=64)
    message = str(err.value)
    assert "\n" not in message and f"model '{folder}' needs about" in message
    assert "float32" in message and "64 tokens" in message and "cpu has" in message
    loaded = models.load_model(str(folder), dtype="float32", device="cpu",
                               memory_limit=needed, token_budget=64)
    assert loaded.dtype == torch.float32
