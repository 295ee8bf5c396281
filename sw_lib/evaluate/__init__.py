"""Evaluation engine: WikiText-2 perplexity, multiple choice, GSM8K; batched and cached.

    from sw_lib.evaluate import perplexity, run_task, EvalCache, TASKS, UnknownTaskError

Protocols follow lm-evaluation-harness 0.4.x (tasks.py); every condition's per-item results
are cached on disk (cache.py) so a baseline is computed once per model.
"""
from __future__ import annotations

from .cache import EvalCache
from .engine import run_task
from .perplexity import perplexity
from .stats import mean_stderr
from .tasks import TASKS, TaskSpec, UnknownTaskError, get_task

__all__ = ["perplexity", "run_task", "EvalCache", "TASKS", "TaskSpec", "UnknownTaskError",
           "get_task", "mean_stderr"]
