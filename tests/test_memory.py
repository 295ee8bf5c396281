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


# --- the token budget "auto": sized to the memory free after loading -------------------------


def _tiny_lm(tokenizer=None):
    return models.from_model(tiny.tiny_model("llama", vocab_size=128), tokenizer, name="tiny")


def _free(monkeypatch, free_bytes: int) -> None:
    """The memory the OS reports as free (available_bytes reads it from psutil or the driver)."""
    monkeypatch.setattr(memory, "available_bytes", lambda device: free_bytes)


def test_auto_is_token_budget_for_the_free_memory_once_per_model(monkeypatch):
    lm = _tiny_lm()
    per_token = memory.activations_bytes(lm.model.config, 1, "float32")
    free = 1200 * per_token + 7  # half of it holds 600 tokens' activations
    _free(monkeypatch, free)
    expected = memory.token_budget_for(free, lm.model.config, "float32")
    assert expected == 600  # below the CPU's cap, so the free memory decides
    assert memory.resolve_token_budget(lm, "auto") == expected == lm.auto_token_budget
    # resolved once per loaded model: memory freed or taken later changes nothing for it...
    _free(monkeypatch, 10 * free)
    assert memory.resolve_token_budget(lm, "auto") == 600
    # ...while another loaded model resolves against what is free then
    assert memory.resolve_token_budget(_tiny_lm(), "auto") == 1024
    # an explicit integer is used exactly as given, whatever is free
    assert memory.resolve_token_budget(lm, 5000) == 5000


def test_auto_is_capped_per_device_type_and_floored(monkeypatch):
    config = tiny.tiny_model("llama", vocab_size=128).config
    per_token = memory.activations_bytes(config, 1, "bfloat16")
    plenty = 10 ** 6 * per_token
    assert memory.auto_token_budget(plenty, config, "bfloat16", "cpu") == 1024
    assert memory.auto_token_budget(plenty, config, "bfloat16", "cuda") == 32768
    assert memory.auto_token_budget(plenty, config, "bfloat16", "mps") == 32768
    assert memory.auto_token_budget(plenty, config, "bfloat16", "xpu") == 1024  # unknown: CPU's
    # a GPU with 2000 tokens' worth free spends half: 1000, under its cap
    assert memory.auto_token_budget(2000 * per_token, config, "bfloat16", "cuda") == 1000
    assert memory.auto_token_budget(3 * per_token, config, "bfloat16", "cuda") == memory.AUTO_FLOOR
    _free(monkeypatch, plenty)
    assert memory.resolve_token_budget(_tiny_lm(), "auto") == 1024  # this machine runs on CPU


@pytest.mark.parametrize("bad", ["lots", 0, -3, 2.5, True, None, "all"])
def test_a_bad_token_budget_is_refused_in_one_line(bad):
    with pytest.raises(ValueError) as err:
        memory.resolve_token_budget(_tiny_lm(), bad)
    assert str(err.value) == ('evaluation.token_budget: must be a positive integer or "auto", '
                              f"got {bad!r}")


def test_auto_checks_the_smallest_pass_before_loading(tmp_path, tokenizer):
    """Before loading, "auto" is not known yet: the model must fit with AUTO_FLOOR tokens."""
    folder = tmp_path / "m"
    tiny.tiny_model("llama", vocab_size=128).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    needed = memory.estimate(tiny.tiny_model("llama", vocab_size=128).config, "float32",
                             memory.AUTO_FLOOR, folder).total_bytes
    with pytest.raises(memory.NotEnoughMemory, match=f"{memory.AUTO_FLOOR} tokens"):
        models.load_model(str(folder), dtype="float32", device="cpu",
                          memory_limit=needed - 1, token_budget="auto")
    loaded = models.load_model(str(folder), dtype="float32", device="cpu", memory_limit=needed)
    assert loaded.auto_token_budget is None  # resolved at the first evaluation, not at loading
