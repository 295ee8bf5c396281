"""dtype "auto" and what bfloat16 evaluation changes (tiny model, against float32)."""
from __future__ import annotations

import copy

import pytest
import torch

from sw_lib import models
from sw_lib.evaluate import perplexity, run_task

from conftest import make_tiny

TEXT = " ".join(f"Sentence number {i} talks about super weights in language models." for i in range(12))


def test_auto_is_bfloat16_exactly_where_the_hardware_multiplies_it_natively(monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    assert models.choose_dtype("auto", cpu) == torch.float32
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: True)
    flags = {"text": "flags : fpu avx512f avx512_bf16 amx_tile amx_bf16 amx_int8"}
    monkeypatch.setattr(models.Path, "read_text", lambda self, *a, **k: flags["text"])
    assert models.choose_dtype("auto", cpu) == torch.bfloat16
    flags["text"] = "flags : fpu avx512f amx_tile amx_int8"  # tiles without bf16 support
    assert models.choose_dtype("auto", cpu) == torch.float32
    assert models.choose_dtype("float32", cpu) == torch.float32  # an explicit choice wins
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert models.choose_dtype("auto", torch.device("cuda")) == torch.float32


def test_bfloat16_evaluation_agrees_with_float32(tokenizer):
    """Log-likelihoods within 0.1 nats per choice (bf16 keeps ~3 significant digits in every
    matmul; log-softmax and sums stay float32), the same choice wherever float32's best choice
    leads by more than 0.5 nats, and perplexity within 1%."""
    lm32 = make_tiny("llama", tokenizer, seed=18)
    model16 = copy.deepcopy(lm32.model).to(torch.bfloat16)
    lm16 = models.from_model(model16, tokenizer, name="tiny-llama-bf16")
    a = run_task(lm32, "hellaswag", 12, cache=False, progress=False)
    b = run_task(lm16, "hellaswag", 12, cache=False, progress=False)
    separated = 0
    for x, y in zip(a["per_item"], b["per_item"]):
        assert all(isinstance(v, float) for v in y["loglikelihoods"])
        assert y["loglikelihoods"] == pytest.approx(x["loglikelihoods"], abs=0.1)
        ranked = sorted(x["loglikelihoods"], reverse=True)
        if ranked[0] - ranked[1] > 0.5:
            separated += 1
            assert y["pred"]["acc"] == x["pred"]["acc"]
    assert separated >= 3  # the check above must have had something to check
    p32 = perplexity(lm32, seq_len=32, cache=False, progress=False, text=TEXT)
    p16 = perplexity(lm16, seq_len=32, cache=False, progress=False, text=TEXT)
    assert p16["perplexity"] == pytest.approx(p32["perplexity"], rel=0.01)
