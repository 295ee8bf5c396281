"""A reference implementation of the original script's evaluation protocol (for timing/checks).

What the original analysis script did, and what `sw_lib.evaluate` avoids:
- batch size 1: one full forward pass per (context, choice), logits at every position;
  GSM8K through `model.generate` one prompt at a time (stop strings checked by generate);
- every choice re-encodes the shared context;
- the baseline is recomputed for every super weight and every task (and again for the
  combined ablation); nothing is cached.

Prompts, items and tokenization are the engine's (lm-eval's), so both produce the same
per-item choices and the timing compares protocols, not prompts.
"""
from __future__ import annotations

import math
from typing import Iterable

import torch

from sw_lib import ablate, data
from sw_lib.evaluate import generation
from sw_lib.evaluate.engine import build_requests
from sw_lib.evaluate.multiple_choice import encode_pair
from sw_lib.evaluate.perplexity import tokens_of, window_indices
from sw_lib.evaluate.tasks import get_task


@torch.no_grad()
def mc_accuracy(lm, task: str, n: int, edits: Iterable = ()) -> dict:
    """Per-item acc / acc_norm choices, one full forward per (context, choice), batch 1."""
    spec = get_task(task)
    requests = build_requests(spec, data.select_items(spec.split, n).items, spec.default_shots)
    per_item = []
    with ablate.edited(lm.model, list(edits)):
        for request in requests:
            lls = []
            for choice in request.choices:
                ctx, cont = encode_pair(lm.tokenizer, request.context, " " + choice)
                ids = torch.tensor([ctx + cont], device=lm.device)
                logits = lm.model(ids[:, :-1]).logits[0].float()
                logp = torch.log_softmax(logits[len(ctx) - 1:], dim=-1)
                lls.append(sum(logp[i, t].item() for i, t in enumerate(cont)))
            norm = [ll / len(c) for ll, c in zip(lls, request.choices)]
            pred = {"acc": max(range(len(lls)), key=lambda i: (lls[i], -i)),
                    "acc_norm": max(range(len(norm)), key=lambda i: (norm[i], -i))}
            per_item.append({"doc_id": request.doc_id, "gold": request.gold, "pred": pred,
                             "loglikelihoods": lls})
    metrics = {m: sum(it["pred"][m] == it["gold"] for it in per_item) / len(per_item)
               for m in spec.metrics}
    return {"task": task, "metrics": metrics, "per_item": per_item}


@torch.no_grad()
def gsm8k(lm, n: int, edits: Iterable = ()) -> dict:
    """Per-item answers, one `generate` call per prompt (greedy, stop strings, 256 tokens)."""
    spec = get_task("gsm8k")
    requests = build_requests(spec, data.select_items(spec.split, n).items, spec.default_shots)
    stops = generation.stop_strings(lm.tokenizer, spec.until)
    per_item = []
    with ablate.edited(lm.model, list(edits)):
        for request in requests:
            ids = torch.tensor([lm.tokenizer.encode(request.context)], device=lm.device)
            out = lm.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                                    max_new_tokens=spec.max_gen_toks, do_sample=False,
                                    stop_strings=stops, tokenizer=lm.tokenizer,
                                    pad_token_id=lm.tokenizer.pad_token_id, temperature=None,
                                    top_p=None, top_k=None)
            text = generation.truncate_at_stops(
                lm.tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True), stops)
            per_item.append(generation.item_result(request, text, spec.metrics))
    metrics = {m: sum(it["correct"][m] for it in per_item) / len(per_item) for m in spec.metrics}
    return {"task": "gsm8k", "metrics": metrics, "per_item": per_item}


@torch.no_grad()
def perplexity(lm, edits: Iterable = (), seq_len: int = 2048, n_windows: int = 4) -> dict:
    """gptq-convention perplexity, one window per forward pass with the model's own loss."""
    tokens = tokens_of(lm.tokenizer, None, "bundled")
    chosen = window_indices(len(tokens) // seq_len, n_windows)
    nlls = []
    with ablate.edited(lm.model, list(edits)):
        for w in chosen:
            ids = torch.tensor([tokens[w * seq_len:(w + 1) * seq_len]], device=lm.device)
            nlls.append(lm.model(ids, labels=ids).loss.item() * (seq_len - 1))
    return {"perplexity": math.exp(sum(nlls) / (len(chosen) * (seq_len - 1))),
            "per_window_nll": nlls, "windows": chosen}


def evaluate_condition(lm, edits, tasks: dict[str, int], seq_len: int, n_windows: int) -> dict:
    return {"perplexity": perplexity(lm, edits, seq_len, n_windows),
            "tasks": {task: gsm8k(lm, n, edits) if task == "gsm8k" else mc_accuracy(lm, task, n, edits)
                      for task, n in tasks.items()}}


def original_protocol(lm, weights: list[ablate.WeightEdit], tasks: dict[str, int],
                      seq_len: int = 2048, n_windows: int = 4) -> dict:
    """Individual ablations (baseline + weight, per weight), then combined (baseline + all)."""
    individual = []
    for weight in weights:
        individual.append({"weight": weight.to_dict(),
                           "baseline": evaluate_condition(lm, [], tasks, seq_len, n_windows),
                           "ablated": evaluate_condition(lm, [weight], tasks, seq_len, n_windows)})
    combined = {"baseline": evaluate_condition(lm, [], tasks, seq_len, n_windows),
                "ablated": evaluate_condition(lm, weights, tasks, seq_len, n_windows)}
    return {"individual": individual, "combined": combined}
