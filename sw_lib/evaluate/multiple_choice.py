"""Multiple-choice scoring: summed continuation log-likelihoods, lm-eval's tokenization.

Tokenization is lm-evaluation-harness's `_encode_pair`: trailing spaces of the context move to
the continuation; whole = encode(context + continuation), context = encode(context), the
continuation's tokens are whole[len(context):]; the tokenizer's own default decides special
tokens (SmolLM2 adds none). The model reads context + continuation minus its last token.

Speed: a question is one packed row, its context once and each choice's tokens as a branch
that sees the context (forward.packed_mask), so the context is encoded once for all choices;
the LM head runs only where a continuation token is predicted. Questions whose contexts start
with the same token prefix (MMLU: a subject's description, and in k-shot its solved
examples) share one encoding of it through the key/value cache; one batch holds questions of
many prefixes, each row attending to its own. Batches are built by length under a
token budget (batching.py). Questions too long for the model, or models that fail
`forward.fast_path_ok`, fall back to one row per (question, choice) through the model's plain
forward, exactly as lm-eval computes it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable

import torch
from torch import nn

from . import forward
from .batching import by_budget
from .prefix import Plan
from .tasks import TARGET_DELIMITER, MCRequest

# Shortest token prefix worth encoding once for several questions (0-shot MMLU's subject
# description is about 15 tokens).
MIN_SHARED = 8


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


# --- the two ways to compute a question's choice log-likelihoods -------------------------


@torch.no_grad()
def _packed_batch(model: nn.Module, batch: list[Encoded], device, plan: Plan | None,
                  past: forward.RowPrefixes | None = None) -> list[list[float]]:
    """One row per question: context, then each choice's tokens (all but the last) as a branch.

    past: the cached prefix of each row (the first past.lengths[b] context tokens of
    question b, already encoded); the row starts after it.
    """
    cached = past.lengths.tolist() if past is not None else [0] * len(batch)
    length = max(e.packed_length - n for e, n in zip(batch, cached))
    ids = torch.zeros(len(batch), length, dtype=torch.long)
    segments = torch.full((len(batch), length), -1, dtype=torch.long)
    positions = torch.zeros(len(batch), length, dtype=torch.long)
    rows, cols, targets, owners = [], [], [], []  # owners: (question, choice) of each target
    for b, (enc, shared) in enumerate(zip(batch, cached)):
        c = len(enc.context)
        ids[b, :c - shared] = torch.tensor(enc.context[shared:])
        segments[b, :c - shared] = 0
        positions[b, :c - shared] = torch.arange(shared, c)
        cursor = c - shared
        for j, cont in enumerate(enc.continuations):
            branch = cont[:-1]
            n = len(branch)
            ids[b, cursor:cursor + n] = torch.tensor(branch, dtype=torch.long)
            segments[b, cursor:cursor + n] = j + 1
            positions[b, cursor:cursor + n] = torch.arange(c, c + n)
            # cont[0] is predicted at the context's last token, cont[i] at branch token i - 1.
            rows.extend([b] * len(cont))
            cols.extend([c - shared - 1] + list(range(cursor, cursor + n)))
            targets.extend(cont)
            owners.extend([(b, j)] * len(cont))
            cursor += n
    hidden = forward.packed_hidden(model, plan, ids.to(device), segments.to(device),
                                   positions.to(device), past)
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


# --- which questions share a prefix ----------------------------------------------------------


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


def shared_prefix_groups(encoded: list[Encoded]) -> list[tuple[int, list[Encoded]]]:
    """(shared token count, questions) groups: questions whose contexts start with the same
    `shared` >= MIN_SHARED tokens (MMLU: a subject's description, and in k-shot its solved
    examples; HellaSwag: consecutive clips of one video); every other question alone with 0.

    Contexts are taken in sorted order; a question joins the running group when the tokens
    the group saves, (members - 1) x shared, do not shrink by it (so two k-shot subjects,
    which share only the description's first words, stay apart). Found on the tokens
    themselves, so a tokenizer that merges across the prefix's end never shares a wrong
    prefix. At least the last context token of every question stays outside the prefix (it
    predicts the answer)."""
    ordered = sorted(encoded, key=lambda e: e.context)
    groups: list[tuple[int, list[Encoded]]] = []
    run: list[Encoded] = []
    shared = 0
    for enc in ordered + [None]:
        if enc is not None and run:
            common = min(shared, _common_prefix(run[0].context, enc.context), len(enc.context) - 1)
            if common >= MIN_SHARED and len(run) * common >= (len(run) - 1) * shared:
                run.append(enc)
                shared = common
                continue
        if len(run) > 1:
            groups.append((shared, run))
        else:
            groups.extend((0, [e]) for e in run)
        run = [enc] if enc is not None else []
        shared = len(enc.context) - 1 if enc is not None else 0
    return groups


def _prefix_chunks(groups: list[tuple[int, list[Encoded]]], token_budget: int
                   ) -> list[list[tuple[int, list[Encoded]]]]:
    """Groups whose prefixes are encoded and kept together: at most `token_budget` prefix
    tokens in all (one group alone when its prefix is longer), so the cached keys and values
    stay bounded like a batch's activations."""
    chunks: list[list[tuple[int, list[Encoded]]]] = []
    total = 0
    for group in groups:
        if chunks and total + group[0] <= token_budget:
            chunks[-1].append(group)
            total += group[0]
        else:
            chunks.append([group])
            total = group[0]
    return chunks


def choice_loglikelihoods(model: nn.Module, encoded: list[Encoded], token_budget: int,
                          on_batch: Callable[[int], None] | None = None,
                          plan: Plan | None = None, max_rows: int | None = None
                          ) -> dict[int, list[float]]:
    """Summed continuation log-likelihood of every choice, by doc_id.

    Batches hold questions of similar length, at most `token_budget` padded tokens (and
    `max_rows` questions); questions that share a prefix are scored after one encoding of
    it, and a batch mixes questions of different prefixes. `plan` lets ablated conditions
    start at their edited layer (prefix.py).
    """
    device = next(model.parameters()).device
    limit = forward.max_length(model)
    fast = forward.fast_path_ok(model)
    packable = [e for e in encoded if fast and e.packed_length <= limit
                and forward.packing_allowed(model, e.packed_length)
                and max(len(e.context) + len(c) for c in e.continuations) <= limit + 1]
    packed_ids = {id(e) for e in packable}
    plain = [e for e in encoded if id(e) not in packed_ids]
    groups = shared_prefix_groups(packable)
    if any(shared for shared, _ in groups) and not forward.shared_prefix_ok(model):
        groups = [(0, [e for _, members in groups for e in members])]
    results: dict[int, list[float]] = {}

    def done(batch, sums):
        for enc, s in zip(batch, sums):
            results[enc.doc_id] = s
        if on_batch:
            on_batch(len(batch))

    # Each chunk of prefixes is encoded once, then its questions are batched by length
    # together with the questions that share nothing (put in the last chunk), so sharing
    # never splits the batches that sorting by length would build.
    singles = [e for shared, members in groups if not shared for e in members]
    chunks = _prefix_chunks([g for g in groups if g[0]], token_budget) or [[]]
    for c, chunk in enumerate(chunks):
        prefixes = (forward.encode_prefixes(model, [m[0].context[:n] for n, m in chunk],
                                            token_budget) if chunk else None)
        # (its prefix's index in the chunk or -1, the prefix's length, question)
        rows = [(g, n, enc) for g, (n, members) in enumerate(chunk) for enc in members]
        if c == len(chunks) - 1:
            rows += [(-1, 0, enc) for enc in singles]
        for batch in by_budget(rows, lambda r: r[2].packed_length - r[1], token_budget, max_rows):
            questions = [enc for _, _, enc in batch]
            past = prefixes.for_rows([g for g, _, _ in batch]) if prefixes else None
            done(questions, _packed_batch(model, questions, device, plan, past))
    # lm-eval's one row per choice: a choice is a row, so the budget counts every choice.
    for batch in by_budget(plain, lambda e: e.packed_length * len(e.continuations),
                           token_budget, max_rows):
        done(batch, _plain_rows(model, batch, device, limit))
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
