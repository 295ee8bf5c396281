"""The WikiText-2 texts the MoE analysis routes, and the reference text for loss ratios.

Both come from the bundled, sha256-verified WikiText-2 test split (`sw_lib.data`); the reference
text is the dense detector's (`sw_lib.reference`: the tail of the test token stream, which no
evaluation reads), so effects in notebooks 01 and 04 are measured on the same tokens.
"""
from __future__ import annotations

import torch

from .. import data, reference


def wikitext_paragraphs() -> list[str]:
    """Article paragraphs in file order (headings ' = Title = ' and blank rows left out)."""
    rows = (row.strip() for row in data.wikitext_rows())
    return [row for row in rows if row and not row.startswith("=")]


def text_ids(tokenizer, num_texts: int, tokens_per_text: int = 128,
             texts: list[str] | None = None) -> torch.Tensor:
    """[num_texts, tokens_per_text] ids: the first paragraphs (of `texts`, default WikiText-2)
    that have at least `tokens_per_text` tokens, each cut to exactly that many (no padding, so
    every routed token is a real one). Tokenized as the model expects, so position 0 is the
    BOS token where the tokenizer adds one, else each text's first token: the attention sink."""
    rows = []
    for text in texts if texts is not None else wikitext_paragraphs():
        ids = tokenizer(text)["input_ids"]
        if len(ids) >= tokens_per_text:
            rows.append(ids[:tokens_per_text])
        if len(rows) == num_texts:
            break
    if not rows:
        raise ValueError(f"no text has {tokens_per_text} tokens; lower tokens_per_text")
    return torch.tensor(rows, dtype=torch.long)


def reference_ids(tokenizer, num_tokens: int = reference.DEFAULT_TOKENS) -> torch.Tensor:
    """[1, num_tokens] ids: the dense detector's reference text (`sw_lib.reference`)."""
    return reference.reference_text(tokenizer, num_tokens).ids
