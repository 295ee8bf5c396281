"""The calibration texts the MoE analysis routes, and the reference text of the verdicts.

Calibration (routing statistics and the experts' peaks that flag super experts): `num_texts`
texts of exactly `tokens_per_text` tokens from the bundled, sha256-verified WikiText-2 test
split (`sw_lib.data`, the only corpus bundled). Each text starts at an article paragraph (so its
first token, the attention sink where super activations form, is the start of real text) and
runs on through the following rows, joined with "\\n\\n" as perplexity joins them, until it has
`tokens_per_text` tokens; the next text starts at the first paragraph after the rows the last
one read, so texts never overlap, in file order. Any length works: the reference calibration of
Su et al. (100 texts of 2048 tokens) as much as the 2-core default (32 of 128). Flagging reads
activation peaks only, never a loss, so sharing the corpus with perplexity evaluates nothing
twice; the reference code profiled C4 windows instead (not bundled here).

The reference text of the verdicts is the dense detector's (`sw_lib.reference`: the tail of the
test token stream, which no evaluation reads), so effects in notebooks 01 and 04 are measured on
the same tokens.
"""
from __future__ import annotations

import torch

from .. import data, reference

SOURCE = ("wikitext-2-raw-v1/test: texts start at article paragraphs and run on through the "
          "following rows (joined with \\n\\n), no two overlap")


def _is_paragraph(row: str) -> bool:
    text = row.strip()
    return bool(text) and not text.startswith("=")


def wikitext_paragraphs() -> list[str]:
    """Article paragraphs in file order (headings ' = Title = ' and blank rows left out)."""
    return [row.strip() for row in data.wikitext_rows() if _is_paragraph(row)]


def _run_on(tokenizer, rows: list[str], start: int, tokens: int) -> tuple[list[int], int] | None:
    """The first `tokens` ids of rows[start:] joined with "\\n\\n" (the first row stripped), and
    the index after the last row read; None when the rows run out first."""
    end = start + 1
    while True:
        ids = tokenizer("\n\n".join([rows[start].strip(), *rows[start + 1:end]]))["input_ids"]
        if len(ids) >= tokens:
            return ids[:tokens], end
        if end >= len(rows):
            return None
        # About four characters per token: read enough rows for the rest in one step.
        missing = 4 * (tokens - len(ids))
        while end < len(rows) and missing > 0:
            missing -= len(rows[end]) + 2
            end += 1


def calibration_ids(tokenizer, num_texts: int, tokens_per_text: int,
                    texts: list[str] | None = None) -> torch.Tensor:
    """[n, tokens_per_text] ids of the calibration texts (module docstring), tokenized as the
    model expects (BOS first where the tokenizer adds one). With `texts`: the first `num_texts`
    of them that have `tokens_per_text` tokens, each cut to that length. Fewer texts than asked
    is an error naming what fits."""
    if num_texts < 1 or tokens_per_text < 2:
        raise ValueError(f"need at least 1 calibration text of at least 2 tokens, got "
                         f"{num_texts} x {tokens_per_text}")
    rows: list[list[int]] = []
    if texts is not None:
        for text in texts:
            ids = tokenizer(text)["input_ids"]
            if len(ids) >= tokens_per_text:
                rows.append(ids[:tokens_per_text])
            if len(rows) == num_texts:
                break
    else:
        lines = data.wikitext_rows()
        start = 0
        while len(rows) < num_texts:
            start = next((i for i in range(start, len(lines)) if _is_paragraph(lines[i])), None)
            found = None if start is None else _run_on(tokenizer, lines, start, tokens_per_text)
            if found is None:
                break
            ids, start = found
            rows.append(ids)
    if len(rows) < num_texts:
        raise ValueError(f"only {len(rows)} calibration text(s) of {tokens_per_text} tokens fit "
                         f"in the {'given texts' if texts is not None else 'WikiText-2 test split'}"
                         f", {num_texts} asked; lower router_analysis_samples or tokens_per_text")
    return torch.tensor(rows, dtype=torch.long)


def reference_ids(tokenizer, num_tokens: int = reference.DEFAULT_TOKENS) -> torch.Tensor:
    """[1, num_tokens] ids: the dense detector's reference text (`sw_lib.reference`)."""
    return reference.reference_text(tokenizer, num_tokens).ids
