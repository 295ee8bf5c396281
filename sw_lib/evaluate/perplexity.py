"""WikiText-2 perplexity in the "gptq" convention (DESIGN section 6).

The hub rows are joined with "\\n\\n" and tokenized once (the tokenizer's default special
tokens, as the convention's `tokenizer(text)` call does); the token stream is cut into
non-overlapping windows of `seq_len` tokens (capped by the model's context), the remainder
dropped. Each window predicts its tokens 2..seq_len, so perplexity = exp(total NLL / total
predicted tokens) = exp(mean per-window loss), as in the GPTQ code.

The last `RESERVED_TAIL_TOKENS` tokens of the WikiText-2 stream are detection's reference text
(`sw_lib.reference`): a window that overlaps them is never evaluated, so no evaluated token is
one that detection judged candidates on. `n_windows=N` evaluates N windows spread evenly over
the `usable` windows that end before that tail: indices floor(i * usable / N) for i = 0..N-1
(N >= usable takes every one). Evenly spread windows cover the whole test set, unlike the
first N, and are the same on every run.
"""
from __future__ import annotations

import math
import time
from typing import Iterable

import torch
from tqdm.auto import tqdm

from .. import ablate, data, memory
from . import cache as cache_mod
from . import forward
from .batching import DEFAULT_BATCH_SIZE, DEFAULT_TOKEN_BUDGET
from .condition import open_condition
from .prefix import Plan, run_decoder

# Tokens at the end of the WikiText-2 stream kept for detection's reference text (its longest).
RESERVED_TAIL_TOKENS = 1024

PROTOCOL = {"name": "wikitext-2-raw-v1/test", "convention": "gptq", "joiner": "\n\n",
            "window_selection": "evenly spaced", "reserved_tail_tokens": RESERVED_TAIL_TOKENS,
            "version": 2}

_TOKENS: dict[tuple, list[int]] = {}  # tokenized text per (tokenizer, text source)


def tokens_of(tokenizer, text: str | None, source: str) -> list[int]:
    """Token ids of the joined WikiText-2 rows (or of `text`), memoised per tokenizer."""
    identity = (type(tokenizer).__name__, getattr(tokenizer, "name_or_path", ""), len(tokenizer))
    key = (identity, source if text is None else ("text", text))
    if key not in _TOKENS:
        joined = "\n\n".join(data.wikitext_rows(source)) if text is None else text
        _TOKENS[key] = tokenizer(joined).input_ids
    return _TOKENS[key]


def window_indices(total: int, n: int | None) -> list[int]:
    if n is None or n >= total:
        return list(range(total))
    if n < 1:
        raise ValueError(f"n_windows must be at least 1, got {n}")
    return [i * total // n for i in range(n)]


def select_windows(total_tokens: int, seq_len: int, n_windows: int | None,
                   reserved_tail: int) -> tuple[list[int], list[int]]:
    """(evaluated, excluded) window indices: `n_windows` spread evenly over the windows that end
    before the last `reserved_tail` tokens, and the full windows left out for overlapping them."""
    total = total_tokens // seq_len
    usable = max(total_tokens - reserved_tail, 0) // seq_len
    if usable == 0:
        raise ValueError(f"every window of {seq_len} tokens overlaps the last {reserved_tail} "
                         "tokens kept for detection's reference text; lower seq_len")
    return window_indices(usable, n_windows), list(range(usable, total))


@torch.no_grad()
def window_nll(model, windows: torch.Tensor, plan: Plan | None = None) -> list[float]:
    """Summed next-token NLL of each row of `windows` [B, L] (L - 1 predictions per row)."""
    device = next(model.parameters()).device
    windows = windows.to(device)
    if forward.fast_path_ok(model):
        hidden = run_decoder(model, plan, input_ids=windows, use_cache=False)
        b, length, h = hidden.shape
        logp = forward.token_logprobs(model, hidden[:, :-1].reshape(-1, h),
                                      windows[:, 1:].reshape(-1))
        return (-logp.double().view(b, length - 1).sum(dim=1)).tolist()
    logits = model(input_ids=windows).logits[:, :-1].float()
    logp = torch.log_softmax(logits, dim=-1).gather(2, windows[:, 1:, None])[..., 0]
    return (-logp.double().sum(dim=1)).tolist()


def _exp(x: float) -> float:
    """exp that saturates at inf (a destroyed model's mean NLL can exceed float range)."""
    try:
        return math.exp(x)
    except OverflowError:
        return float("inf")


def perplexity(lm, edits=(), seq_len: int = 2048, n_windows: int | None = None,
               batch_size: int | None = DEFAULT_BATCH_SIZE, cache=None, progress: bool = True,
               source: str = "bundled", text: str | None = None, keep_layers: Iterable[int] = (),
               token_budget: int | str = DEFAULT_TOKEN_BUDGET) -> dict:
    """Perplexity of `lm` (with `edits` applied) on WikiText-2 test, or on `text` if given.

    cache: None = EvalCache.default(), False = no cache, or an EvalCache / folder.
    batch_size, token_budget: windows per forward pass, at most `batch_size` and at most
    `token_budget` tokens (one window at least; "auto": memory.resolve_token_budget).
    keep_layers: layers whose inputs this run keeps in the cache's memory (`EvalCache.states`),
    so that a later condition edited at such a layer starts there (prefix.py); pass the super
    weights' layers while evaluating the baseline. Inactive with cache=False.
    """
    start_time = time.perf_counter()
    token_budget = memory.resolve_token_budget(lm, token_budget)
    edits = list(edits)
    seq_len = min(seq_len, forward.max_length(lm.model))
    tokens = tokens_of(lm.tokenizer, text, source)
    total = len(tokens) // seq_len
    if total == 0:
        raise ValueError(f"the text has {len(tokens)} tokens, fewer than one window of {seq_len}")
    reserved = 0 if text is not None else RESERVED_TAIL_TOKENS  # a custom text keeps them all
    chosen, excluded = select_windows(len(tokens), seq_len, n_windows, reserved)
    name = PROTOCOL["name"] if text is None else "custom text"
    task_key = {**PROTOCOL, "name": "perplexity" if text is None else "perplexity-text",
                "seq_len": seq_len, "total_tokens": len(tokens), "source": source,
                "text_digest": None if text is None else cache_mod.digest(text)}
    condition = open_condition(lm, edits, task_key, cache, keep_layers)
    store = condition.store
    found, missing = store.lookup(condition.key, chosen) if store else ({}, list(chosen))

    computed: dict[str, dict] = {}
    if missing:
        bar = tqdm(total=len(missing), desc=condition.label("perplexity"), unit="window",
                   disable=not progress)
        per_batch = max(1, min(batch_size or len(missing), token_budget // seq_len))
        with ablate.edited(lm.model, edits):
            for i in range(0, len(missing), per_batch):
                batch = missing[i:i + per_batch]
                windows = torch.tensor([tokens[w * seq_len:(w + 1) * seq_len] for w in batch])
                for w, nll in zip(batch, window_nll(lm.model, windows, condition.plan)):
                    computed[str(w)] = {"window": w, "nll": nll}
                bar.update(len(batch))
        bar.close()
        if store:
            store.store(condition.key, computed)

    results = {**found, **computed}
    per_window = [results[str(w)]["nll"] for w in chosen]
    n_tokens = len(chosen) * (seq_len - 1)
    nll_sum = sum(per_window)
    return {
        "perplexity": _exp(nll_sum / n_tokens), "nll_sum": nll_sum, "n_tokens": n_tokens,
        "n_windows": len(chosen), "seq_len": seq_len, "per_window_nll": per_window,
        "windows": chosen,
        "dataset_info": {"name": name, "source": source, "total_tokens": len(tokens),
                         "total_windows": total, "windows_used": len(chosen),
                         "excluded_windows": excluded, "reserved_tail_tokens": reserved,
                         "window_selection": "evenly spaced over the usable windows: "
                                             "floor(i * usable / n)",
                         "convention": "gptq: rows joined with \\n\\n, non-overlapping windows"},
        "edits": [e.to_dict() for e in edits],
        "info": {"seconds": time.perf_counter() - start_time, "computed_windows": len(computed),
                 "cached_windows": len(found), **condition.info()},
    }
