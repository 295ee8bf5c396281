"""Multiple-choice scoring: summed continuation log-likelihoods, lm-eval's tokenization.

Tokenization is lm-evaluation-harness's `_encode_pair`: trailing spaces of the context move to
the continuation; whole = encode(context + continuation), context = encode(context), the
continuation's tokens are whole[len(context):]; the tokenizer's own default decides special
tokens (SmolLM2 adds none). The model reads context + continuation minus its last token.

Speed: a question is one packed row, its context once and each choice's tokens as a branch
that sees the context (forward.packed_mask), so the context is encoded once for all choices;
the LM head runs only where a continuation token is predicted. Questions too long for the
model, or models that fail `forward.fast_path_ok`, fall back to one row per (question, choice)
through the model's plain forward, exactly as lm-eval computes it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable

import torch
from torch import nn

from . import forward
from .tasks import TARGET_DELIMITER, MCRequest


@dataclass
class Encoded:
    doc_id: int
    context: list[int]
    continuations: list[list[int]]

    @property
    def packed_length(self) -> int:
        return len(self.context) + sum(len(c) - 1 for c in self.continuations)


def encode(tokenizer, text: str) -> list[int]:
    return tokenizer.encode(text)


def encode_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """lm-eval 0.4's `_encode_pair` for causal models."""
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces > 0:
        continuation = context[-n_spaces:] + continuation
        context = context[:-n_spaces]
    whole = encode(tokenizer, context + continuation)
    context_enc = encode(tokenizer, context)
    return context_enc, whole[len(context_enc):]


def encode_request(tokenizer, request: MCRequest) -> Encoded:
    pairs = [encode_pair(tokenizer, request.context, TARGET_DELIMITER + c) for c in request.choices]
    return Encoded(request.doc_id, pairs[0][0], [cont for _, cont in pairs])


def max_length(model: nn.Module) -> int:
    config = model.config
    for name in ("max_position_embeddings", "n_positions", "max_sequence_length"):
        if getattr(config, name, None):
            return int(getattr(config, name))
    return 2048


# --- the two ways to compute a question's choice log-likelihoods -------------------------


@torch.no_grad()
def _packed_batch(model: nn.Module, batch: list[Encoded], device) -> list[list[float]]:
    """One row per question: context, then each choice's tokens (all but the last) as a branch."""
    length = max(e.packed_length for e in batch)
    ids = torch.zeros(len(batch), length, dtype=torch.long)
    segments = torch.full((len(batch), length), -1, dtype=torch.long)
    positions = torch.zeros(len(batch), length, dtype=torch.long)
    rows, cols, targets, owners = [], [], [], []  # owners: (question, choice) of each target
    for b, enc in enumerate(batch):
        c = len(enc.context)
        ids[b, :c] = torch.tensor(enc.context)
        segments[b, :c] = 0
        positions[b, :c] = torch.arange(c)
        cursor = c
        for j, cont in enumerate(enc.continuations):
            branch = cont[:-1]
            n = len(branch)
            ids[b, cursor:cursor + n] = torch.tensor(branch, dtype=torch.long)
            segments[b, cursor:cursor + n] = j + 1
            positions[b, cursor:cursor + n] = torch.arange(c, c + n)
            # cont[0] is predicted at the context's last token, cont[i] at branch token i - 1.
            rows.extend([b] * len(cont))
            cols.extend([c - 1] + list(range(cursor, cursor + n)))
            targets.extend(cont)
            owners.extend([(b, j)] * len(cont))
            cursor += n
    hidden = forward.packed_hidden(model, ids.to(device), segments.to(device), positions.to(device))
    picked = hidden[torch.tensor(rows, device=device), torch.tensor(cols, device=device)]
    logp = forward.token_logprobs(model, picked, torch.tensor(targets, device=device)).tolist()
    sums = [[0.0] * len(e.continuations) for e in batch]
    for (b, j), value in zip(owners, logp):
        sums[b][j] += value
    return sums


@torch.no_grad()
def _plain_rows(model: nn.Module, batch: list[Encoded], device, limit: int) -> list[list[float]]:
    """lm-eval's way: one right-padded row per (question, choice), the model's own logits."""
    seqs, spans = [], []
    for enc in batch:
        for cont in enc.continuations:
            whole = (enc.context + cont)[-(limit + 1):]
            seqs.append(whole[:-1])
            spans.append((len(seqs[-1]) - len(cont), cont))
    length = max(len(s) for s in seqs)
    ids = torch.zeros(len(seqs), length, dtype=torch.long)
    mask = torch.zeros(len(seqs), length, dtype=torch.long)
    for r, seq in enumerate(seqs):
        ids[r, :len(seq)] = torch.tensor(seq)
        mask[r, :len(seq)] = 1
    logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits
    values = []
    for r, (start, cont) in enumerate(spans):
        logp = torch.log_softmax(logits[r, start:start + len(cont)].float(), dim=-1)
        values.append(logp.gather(1, torch.tensor(cont, device=device)[:, None]).sum().item())
    sums, k = [], 0
    for enc in batch:
        sums.append(values[k:k + len(enc.continuations)])
        k += len(enc.continuations)
    return sums


def choice_loglikelihoods(model: nn.Module, encoded: list[Encoded], batch_size: int = 8,
                          on_batch: Callable[[int], None] | None = None) -> dict[int, list[float]]:
    """Summed continuation log-likelihood of every choice, by doc_id."""
    device = next(model.parameters()).device
    limit = max_length(model)
    fast = forward.fast_path_ok(model)
    packable = [e for e in encoded if fast and e.packed_length <= limit
                and forward.packing_allowed(model, e.packed_length)
                and max(len(e.context) + len(c) for c in e.continuations) <= limit + 1]
    packed_ids = {id(e) for e in packable}
    plain = [e for e in encoded if id(e) not in packed_ids]
    results: dict[int, list[float]] = {}
    # Longest first (as lm-eval): similar lengths share a batch, little padding.
    for group, run in ((packable, _packed_batch), (plain, None)):
        group = sorted(group, key=lambda e: -e.packed_length)
        step = batch_size if run is not None else max(1, batch_size // 2)
        for start in range(0, len(group), step):
            batch = group[start:start + step]
            sums = (run(model, batch, device) if run is not None
                    else _plain_rows(model, batch, device, limit))
            for enc, s in zip(batch, sums):
                results[enc.doc_id] = s
            if on_batch:
                on_batch(len(batch))
    return results


def item_result(request: MCRequest, loglikelihoods: list[float], metrics: Iterable[str]) -> dict:
    """Per-item predictions: acc = argmax sum; acc_norm = argmax sum / len(choice text)."""
    lengths = [float(len(c)) for c in request.choices]
    scores = {"acc": loglikelihoods,
              "acc_norm": [ll / n if n else ll for ll, n in zip(loglikelihoods, lengths)]}
    pred = {m: max(range(len(scores[m])), key=lambda i: (scores[m][i], -i)) for m in metrics}
    return {"doc_id": request.doc_id, "gold": request.gold, "pred": pred,
            "correct": {m: int(pred[m] == request.gold) for m in metrics},
            "loglikelihoods": loglikelihoods, "choice_chars": lengths}
