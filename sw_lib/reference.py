"""Detection's reference text, and what a condition does to it.

The reference text is the tail of the token stream that WikiText-2 perplexity reads (test rows
joined with "\\n\\n", tokenized once: `evaluate.perplexity.tokens_of`): its last `n_tokens`
tokens. Perplexity never evaluates a window that overlaps the last
`perplexity.RESERVED_TAIL_TOKENS` tokens, and the accuracy tasks are other datasets, so no token
that detection judges a candidate on is ever an evaluated token.

A condition is any set of edits (`sw_lib.edits.EditSet`: zeroed or scaled scalars, whole experts
skipped, hooks). `Meter` measures conditions on the reference: the per-token next-token
negative log-likelihood in float32 (whatever the model's dtype), once for the unchanged model
and once per condition. A condition changes nothing below its lowest layer, so the unchanged
model's input to that layer is recorded once and the condition's pass starts there
(`sw_lib.prefix`).

Used by `detect` and `verdict` (dense and expert super weights) and by `moe.verdicts`; it imports
neither of them.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

import torch
from torch import nn

from . import config, prefix
from .edits import EditSet
from .evaluate.perplexity import PROTOCOL, RESERVED_TAIL_TOKENS, tokens_of

DEFAULT_TOKENS = config.default("detection.reference_tokens")  # at most RESERVED_TAIL_TOKENS


# --- the text --------------------------------------------------------------------------------


@dataclass(frozen=True)
class ReferenceText:
    """`ids` [1, n] = tokens [start, end) of the WikiText-2 test stream of `total_tokens`."""

    ids: torch.Tensor
    start: int
    end: int
    total_tokens: int
    source: str  # which copy of WikiText-2: "bundled" or "hub"

    @property
    def n_tokens(self) -> int:
        return self.end - self.start

    def info(self) -> dict:
        """What the detection JSON says about the text it judged candidates on."""
        return {
            "source": f"{PROTOCOL['name']} ({self.source} copy): test rows joined with "
                      "\\n\\n, tokenized once, the last n_tokens tokens",
            "token_span": [self.start, self.end], "n_tokens": self.n_tokens,
            "total_tokens": self.total_tokens,
            "disjoint": f"from every perplexity window (windows overlapping the last "
                        f"{RESERVED_TAIL_TOKENS} tokens are never evaluated) and every accuracy "
                        "item (HellaSwag, ARC, MMLU and GSM8K are other datasets)",
        }


def reference_span(total_tokens: int, n_tokens: int) -> tuple[int, int]:
    """[start, end) of the last `n_tokens` of a stream of `total_tokens`."""
    if not 2 <= n_tokens <= RESERVED_TAIL_TOKENS:
        raise ValueError(f"reference_tokens must be between 2 and {RESERVED_TAIL_TOKENS} (the "
                         f"tail that perplexity never evaluates), got {n_tokens}")
    return total_tokens - n_tokens, total_tokens


def reference_text(tokenizer, n_tokens: int = DEFAULT_TOKENS,
                   source: str = "bundled") -> ReferenceText:
    """The last `n_tokens` tokens of the WikiText-2 test stream, as perplexity tokenizes it."""
    tokens = tokens_of(tokenizer, None, source)
    start, end = reference_span(len(tokens), n_tokens)
    return ReferenceText(torch.tensor([tokens[start:end]], dtype=torch.long), start, end,
                         len(tokens), source)


# --- measuring -------------------------------------------------------------------------------


@torch.no_grad()
def token_nll(model: nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    """Next-token negative log-likelihood of each predicted token of [1, n] ids: [n - 1]
    float32 on the CPU (logits cast to float32 before the softmax)."""
    input_ids = input_ids.to(next(model.parameters()).device)
    logits = model(input_ids).logits[0, :-1].float()
    return torch.nn.functional.cross_entropy(logits, input_ids[0, 1:], reduction="none").cpu()


def mean_loss(model: nn.Module, input_ids: torch.Tensor) -> float:
    """Mean next-token negative log-likelihood of [1, n] ids, in float32."""
    return float(token_nll(model, input_ids).mean())


class Meter:
    """Per-token NLL of conditions on one text, with the unchanged model's as `baseline`.

    `layers`: where the conditions to be measured start; the unchanged model's inputs to those
    layers are recorded with the baseline, and a condition starting there skips the layers
    below. A condition starting elsewhere runs the whole model (same numbers, more time).
    """

    def __init__(self, model: nn.Module, input_ids: torch.Tensor, layers: Iterable[int] = ()):
        self.model, self.input_ids = model, input_ids
        with prefix.recording_inputs(model, layers) as inputs:
            self.baseline = token_nll(model, input_ids)
        self.inputs = inputs

    def nll(self, condition: EditSet) -> torch.Tensor:
        start = condition.first_layer
        if start not in self.inputs:
            start = 0  # nothing recorded: run every layer
        with prefix.starting_at(self.model, start, self.inputs.get(start)), \
                condition.applied(self.model):
            return token_nll(self.model, self.input_ids)

    def differences(self, condition: EditSet) -> torch.Tensor:
        """NLL(condition) - NLL(unchanged) per predicted token, float32."""
        return self.nll(condition) - self.baseline
