"""The WikiText-2 texts the MoE analysis routes, and the short reference text for loss ratios.

Reads the bundled raw WikiText-2 test file (sha256-checked against the package MANIFEST).
"""
from __future__ import annotations

import functools
import gzip
import hashlib
import json
from pathlib import Path

import torch

DATA_DIR = Path(__file__).resolve().parent.parent / "data"
WIKITEXT_KEY = "wikitext-2-raw-v1/test"


@functools.lru_cache(maxsize=1)
def wikitext_raw() -> str:
    """The raw WikiText-2 test text (4358 lines), verified against MANIFEST.json."""
    entry = json.loads((DATA_DIR / "MANIFEST.json").read_text())[WIKITEXT_KEY]
    raw = gzip.decompress((DATA_DIR / entry["file"]).read_bytes())
    if hashlib.sha256(raw).hexdigest() != entry["sha256_uncompressed"]:
        raise ValueError(f"bundled {entry['file']} does not match its sha256 in MANIFEST.json; "
                         "reinstall sw_lib")
    return raw.decode("utf-8")


def wikitext_paragraphs() -> list[str]:
    """Article paragraphs in file order (headings ' = Title = ' and blank lines left out)."""
    lines = (line.strip() for line in wikitext_raw().splitlines())
    return [line for line in lines if line and not line.startswith("=")]


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


def reference_ids(tokenizer, num_tokens: int = 512) -> torch.Tensor:
    """[1, num_tokens] ids: the start of WikiText-2 test (the short reference text for loss
    ratios)."""
    raw = wikitext_raw()
    chars = num_tokens * 8
    while True:
        ids = tokenizer(raw[:chars])["input_ids"]
        if len(ids) > num_tokens or chars >= len(raw):
            return torch.tensor([ids[:num_tokens]], dtype=torch.long)
        chars *= 2
