"""On-disk cache of per-item evaluation results, so each condition is computed once.

A condition is (model fingerprint, weight edits, task spec with its protocol version and shots,
engine version, device and dtype). Its results live in one JSON file, one entry per item id
(MC question, GSM8K question, perplexity window), so a later run over more or fewer items
reuses whatever overlaps. The baseline of a model is therefore computed once and reused by
every ablation, notebook and rerun. Writes merge with what is on disk and are atomic.
"""
from __future__ import annotations

import hashlib
import json
import os
import uuid
from pathlib import Path

from .prefix import DEFAULT_BUDGET, LayerStates

# Bump when the engine's numerics or per-item result format change (invalidates old entries),
# so that a baseline and an ablation are never paired across engines. 2: batches that mix
# questions of different shared prefixes (b628d30) moved bfloat16 roundings of a few choices.
ENGINE_VERSION = 2


def digest(obj) -> str:
    text = json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.blake2b(text.encode(), digest_size=12).hexdigest()


def condition_key(lm, fingerprint: str, edits_key: tuple, task_key: dict) -> dict:
    """Everything a cached result depends on, as plain JSON (`fingerprint`: of the weights the
    edits apply to, see weights.py)."""
    return {"engine": ENGINE_VERSION, "model": fingerprint, "edits": [list(e) for e in edits_key],
            "task": task_key, "dtype": str(lm.dtype), "device": lm.device.type,
            "tokenizer": type(lm.tokenizer).__name__ + f"/{len(lm.tokenizer)}"}


class EvalCache:
    """Per-item results under `root/<model fingerprint>/<task>/<condition digest>.json`.

    `states` is the in-memory companion of the files: the layer inputs kept by one condition
    for the next ones to start at their edited layer (prefix.py); it lives as long as this
    object, so pass the same EvalCache to every condition of a study.
    """

    def __init__(self, root: str | Path, states_budget: int = DEFAULT_BUDGET):
        self.root = Path(root)
        self.hits = 0
        self.misses = 0
        self.states = LayerStates(states_budget)

    @classmethod
    def default(cls) -> "EvalCache":
        from ..models import cache_root

        return cls(cache_root() / "eval")

    def path(self, key: dict) -> Path:
        task = key["task"].get("name", "task")
        return self.root / key["model"][:16] / task / f"{digest(key)}.json"

    def load(self, key: dict) -> dict[str, dict]:
        """Cached results of a condition, by item id as a string ({} when none)."""
        path = self.path(key)
        if not path.is_file():
            return {}
        try:
            stored = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            return {}  # a damaged entry is recomputed, never trusted
        return stored.get("items", {}) if stored.get("key") == json.loads(json.dumps(key)) else {}

    def lookup(self, key: dict, ids: list) -> tuple[dict[str, dict], list]:
        """(cached results for `ids`, ids still to compute); counts hits and misses."""
        stored = self.load(key)
        found = {str(i): stored[str(i)] for i in ids if str(i) in stored}
        missing = [i for i in ids if str(i) not in stored]
        self.hits += len(found)
        self.misses += len(missing)
        return found, missing

    def store(self, key: dict, results: dict) -> Path:
        """Merge `results` (item id -> result) into the condition's file, atomically."""
        path = self.path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        items = self.load(key)
        items.update({str(k): v for k, v in results.items()})
        tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
        tmp.write_text(json.dumps({"key": key, "items": items}))
        os.replace(tmp, path)
        return path


def resolve(cache) -> EvalCache | None:
    """cache=None: the default cache; False: no caching; a path or an EvalCache: that one."""
    if cache is None:
        return EvalCache.default()
    if cache is False:
        return None
    if isinstance(cache, EvalCache):
        return cache
    return EvalCache(cache)
