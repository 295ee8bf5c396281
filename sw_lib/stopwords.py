"""The stop-word list shipped with the package, and which tokens of a vocabulary are stop words.

The list (`data/stopwords/english.txt`, 317 words, one a line) is scikit-learn's
ENGLISH_STOP_WORDS (BSD-3-Clause), itself the Glasgow Information Retrieval Group's stop list;
`data/stopwords/MANIFEST.json` names its source and holds its sha256, checked on reading
(apart from the evaluation splits' `data/MANIFEST.json`: it is no split).

A token is a stop word when its text, stripped of surrounding whitespace and lower-cased, is in
the list: " the", "The" and "the" all count, and so does a word piece that spells a stop word
on its own ("an" of "an|imal"); punctuation does not.
"""
from __future__ import annotations

import hashlib
import json
from functools import lru_cache

from . import data

NAME = "stopwords/english"
MANIFEST = data.DATA_DIR / "stopwords" / "MANIFEST.json"


def _entry() -> dict:
    try:
        return json.loads(MANIFEST.read_text())[NAME]
    except (OSError, KeyError, ValueError):
        raise data.DataError(f"Stop-word manifest {MANIFEST} is missing or unreadable; "
                             f"{data.REINSTALL}") from None


@lru_cache(maxsize=1)
def words() -> frozenset[str]:
    """The shipped stop words (sha256-verified against the manifest)."""
    entry = _entry()
    path = data.DATA_DIR / entry["file"]
    try:
        raw = path.read_bytes()
    except OSError:
        raise data.DataError(f"Stop-word list {path} is missing; {data.REINSTALL}") from None
    if hashlib.sha256(raw).hexdigest() != entry["sha256"]:
        raise data.DataError(f"Stop-word list {path} is corrupt (sha256 does not match "
                             f"MANIFEST.json); {data.REINSTALL}")
    return frozenset(line.strip() for line in raw.decode("utf-8").splitlines() if line.strip())


def source() -> dict:
    """What the JSON says about the list: name, source, licence, number of words."""
    entry = _entry()
    return {"name": NAME, "source": entry["source"], "license": entry["license"],
            "n_words": len(words())}


def is_stop_word(text: str) -> bool:
    return text.strip().lower() in words()


def token_ids(tokenizer) -> list[int]:
    """Ids of the vocabulary's tokens that are stop words (each token decoded alone)."""
    texts = tokenizer.batch_decode([[i] for i in range(len(tokenizer))])
    return [i for i, text in enumerate(texts) if is_stop_word(text)]
