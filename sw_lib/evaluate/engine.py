"""`run_task`: evaluate one condition (model + weight edits) on one task, reusing the cache.

Flow: pick the items (sw_lib.data), find which weights the model holds now (weights.py: the
caller's own edits count), look the items' results up in the cache, build and score only the
missing ones with the edits applied (restored afterwards), store them, then aggregate every
metric with its standard error over the selected items.
"""
from __future__ import annotations

import time
from typing import Iterable

from tqdm.auto import tqdm

from .. import ablate, data, memory
from . import generation, multiple_choice
from .batching import DEFAULT_BATCH_SIZE, DEFAULT_TOKEN_BUDGET
from .condition import open_condition
from .prefix import Plan
from .stats import summarize
from .tasks import TaskSpec, fewshot_rows, get_task


def _check_shots(spec: TaskSpec, shots: int | None) -> int:
    shots = spec.default_shots if shots is None else int(shots)
    if shots < 0:
        raise ValueError(f"shots must be >= 0, got {shots}")
    if shots and spec.fewshot_split is None:
        raise ValueError(f"task '{spec.name}' supports only 0-shot here (its few-shot split is "
                         "not bundled); use shots=0")
    return shots


def build_requests(spec: TaskSpec, items: list[tuple[int, dict]], shots: int,
                   source: str = "bundled") -> list:
    pool = data.load_split(spec.fewshot_split, source) if shots else []
    exemplars = fewshot_rows(spec, items, shots, pool)
    return [spec.build(row, doc_id, exemplars[doc_id]) for doc_id, row in items]


def _compute(lm, spec: TaskSpec, requests: list, batch_size: int, token_budget: int,
             plan: Plan | None, progress: bool, label: str) -> dict[str, dict]:
    """Per-item results of `requests` (edits already applied by the caller)."""
    bar = tqdm(total=len(requests), desc=label, unit="item", disable=not progress)
    try:
        if spec.output == "multiple_choice":
            encoded = [multiple_choice.encode_request(lm.tokenizer, r) for r in requests]
            sums = multiple_choice.choice_loglikelihoods(lm.model, encoded, token_budget,
                                                         bar.update, plan, batch_size)
            return {str(r.doc_id): multiple_choice.item_result(r, sums[r.doc_id], spec.metrics)
                    for r in requests}
        texts = generation.generate(lm.model, lm.tokenizer, requests, spec.until,
                                    spec.max_gen_toks, token_budget, batch_size, bar.update, plan)
        return {str(r.doc_id): generation.item_result(r, texts[r.doc_id], spec.metrics)
                for r in requests}
    finally:
        bar.close()


def run_task(lm, task: str | TaskSpec, n_samples: int | None = None, edits=(), cache=None,
             shots: int | None = None, batch_size: int | None = DEFAULT_BATCH_SIZE,
             progress: bool = True,
             source: str = "bundled", keep_layers: Iterable[int] = (),
             token_budget: int | str = DEFAULT_TOKEN_BUDGET) -> dict:
    """Evaluate `lm` with `edits` applied on the first `n_samples` items of `task`.

    task: a name in TASKS or a TaskSpec; shots: None = the task's default (MMLU 0, GSM8K 5);
    cache: None = EvalCache.default(), False = no cache, or an EvalCache / folder.
    batch_size, token_budget: items per forward pass, at most `batch_size` (None: no cap) and
    at most `token_budget` padded tokens (generation counts prompt + max_gen_toks per row;
    "auto": sized to the free memory once per model, memory.resolve_token_budget).
    keep_layers: layers whose inputs this run keeps in the cache's memory (`EvalCache.states`),
    so that a later condition edited at such a layer starts there (prefix.py); pass the super
    weights' layers while evaluating the baseline, and the same EvalCache to every condition.
    Inactive with cache=False. Weights the caller edited around the call are part of the key.
    """
    start_time = time.perf_counter()
    spec = get_task(task)  # bad input is refused before the model is looked at
    shots = _check_shots(spec, shots)
    token_budget = memory.resolve_token_budget(lm, token_budget)
    edits = list(edits)
    selection = data.select_items(spec.split, n_samples, source)
    condition = open_condition(lm, edits, {**spec.key(shots), "source": source}, cache,
                               keep_layers)
    store = condition.store
    found, missing_ids = (store.lookup(condition.key, selection.doc_ids) if store
                          else ({}, selection.doc_ids))

    computed: dict[str, dict] = {}
    if missing_ids:
        missing = set(missing_ids)
        requests = build_requests(spec, [it for it in selection.items if it[0] in missing],
                                  shots, source)
        with ablate.edited(lm.model, edits):
            computed = _compute(lm, spec, requests, batch_size, token_budget, condition.plan,
                                progress, condition.label(spec.name))
        if store:
            store.store(condition.key, computed)

    results = {**found, **computed}
    per_item = [results[str(doc_id)] for doc_id in selection.doc_ids]
    metrics = {m: summarize([item["correct"][m] for item in per_item]) for m in spec.metrics}
    seconds = time.perf_counter() - start_time
    return {
        "task": spec.name, "primary_metric": spec.primary_metric, "metrics": metrics,
        "n_samples": len(per_item), "n_requested": n_samples, "capped": selection.capped,
        "per_item": per_item,
        "edits": [e.to_dict() for e in edits],
        "info": {**selection.summary(), "shots": shots, "protocol_version": spec.version,
                 "description": spec.description, "computed_items": len(computed),
                 "cached_items": len(found), "seconds": seconds,
                 "items_per_second": len(computed) / seconds if computed and seconds else None,
                 **condition.info()},
    }
