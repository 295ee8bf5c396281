"""The engine's one-time costs in a process, paid before any timing starts (both benchmarks).

Reading the tasks' data (and few-shot splits), the fast paths' self-checks on the model
(packed rows, a shared prefix: one 1-shot MMLU call exercises both) and, if asked, tokenizing
WikiText-2 for perplexity. None of it is the work of a task.
"""
from __future__ import annotations


def engine_warm_up(lm, tasks, perplexity: bool = False) -> None:
    from sw_lib import data
    from sw_lib.evaluate import TASKS, run_task
    from sw_lib.evaluate import perplexity as evaluate_perplexity

    for task in tasks:
        spec = TASKS[task]
        data.load_split(spec.split)
        if spec.fewshot_split:
            data.load_split(spec.fewshot_split)
    if perplexity:
        evaluate_perplexity(lm, seq_len=16, n_windows=1, cache=False, progress=False)
    run_task(lm, "mmlu", 2, shots=1, cache=False, progress=False)
