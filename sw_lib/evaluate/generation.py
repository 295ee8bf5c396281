"""Greedy generation for GSM8K, as lm-evaluation-harness's `generate_until` does it.

Contexts are left-padded into batches and decoded greedily until a stop string appears in
every row or `max_gen_toks` new tokens exist; the text is decoded without special tokens and
cut at the first stop string (the task's `until` plus the tokenizer's end-of-sequence text).
Contexts longer than the model's window minus `max_gen_toks` keep their last tokens.
"""
from __future__ import annotations

from typing import Callable, Iterable

import torch
from torch import nn

from .multiple_choice import max_length
from .tasks import GSM8K_EXTRACTORS, GenRequest, normalize_answer


def stop_strings(tokenizer, until: Iterable[str]) -> list[str]:
    stops = [s for s in until if s]
    eos = tokenizer.eos_token
    if eos and eos not in stops:
        stops.append(eos)
    return stops


def truncate_at_stops(text: str, stops: Iterable[str]) -> str:
    for stop in stops:
        text = text.split(stop)[0]
    return text


@torch.no_grad()
def greedy_batch(model: nn.Module, tokenizer, contexts: list[str], stops: list[str],
                 max_gen_toks: int) -> list[str]:
    """Greedy continuations of `contexts` (one batch), cut at the first stop string."""
    device = next(model.parameters()).device
    keep = max_length(model) - max_gen_toks
    encoded = [tokenizer.encode(c)[-keep:] for c in contexts]
    width = max(len(e) for e in encoded)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    ids = torch.full((len(encoded), width), pad, dtype=torch.long)
    mask = torch.zeros(len(encoded), width, dtype=torch.long)
    for r, e in enumerate(encoded):  # left padding: every row's last token is at the end
        ids[r, width - len(e):] = torch.tensor(e)
        mask[r, width - len(e):] = 1
    out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device),
                         max_new_tokens=max_gen_toks, do_sample=False, num_beams=1,
                         stop_strings=stops, tokenizer=tokenizer, pad_token_id=pad,
                         temperature=None, top_p=None, top_k=None)
    texts = tokenizer.batch_decode(out[:, width:].tolist(), skip_special_tokens=True)
    return [truncate_at_stops(t, stops) for t in texts]


def generate(model: nn.Module, tokenizer, requests: list[GenRequest], until: Iterable[str],
             max_gen_toks: int, batch_size: int = 8,
             on_batch: Callable[[int], None] | None = None) -> dict[int, str]:
    """Generated text for every request, by doc_id (longest contexts batched first)."""
    stops = stop_strings(tokenizer, until)
    ordered = sorted(requests, key=lambda r: -len(r.context))
    texts: dict[int, str] = {}
    for start in range(0, len(ordered), batch_size):
        batch = ordered[start:start + batch_size]
        for request, text in zip(batch, greedy_batch(model, tokenizer, [r.context for r in batch],
                                                     stops, max_gen_toks)):
            texts[request.doc_id] = text
        if on_batch:
            on_batch(len(batch))
    return texts


def item_result(request: GenRequest, text: str, metrics: Iterable[str]) -> dict:
    """Extract the answer each metric's filter finds and compare it with the reference."""
    gold = normalize_answer(request.gold)
    pred = {m: GSM8K_EXTRACTORS[m](text) for m in metrics}
    return {"doc_id": request.doc_id, "gold": gold, "pred": pred,
            "correct": {m: int(normalize_answer(pred[m]) == gold) for m in metrics},
            "generation": text}
