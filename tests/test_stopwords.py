"""sw_lib.stopwords: the shipped list, verified, and which vocabulary tokens are stop words."""
from __future__ import annotations

import shutil

import pytest

from sw_lib import data, stopwords


def test_shipped_list_is_the_manifest_one():
    words = stopwords.words()
    assert len(words) == 317 == stopwords.source()["n_words"]
    assert {"the", "and", "of", "amongst", "whereupon"} <= words
    assert not {"apple", "company", ".", ""} & words
    assert "BSD" in stopwords.source()["license"]


def test_token_texts_match_stripped_and_lower_cased():
    assert stopwords.is_stop_word(" the") and stopwords.is_stop_word("The\n")
    assert not stopwords.is_stop_word(" Apple") and not stopwords.is_stop_word(",")


def test_vocabulary_tokens_are_the_ones_that_decode_to_a_stop_word(tokenizer):
    ids = stopwords.token_ids(tokenizer)
    brute = [i for i in range(len(tokenizer))
             if tokenizer.decode([i]).strip().lower() in stopwords.words()]
    assert ids == brute and len(ids) > 300  # " the", "The", "the", ...
    assert tokenizer(" the").input_ids[0] in ids


def test_a_corrupt_list_is_a_one_line_error(tmp_path, monkeypatch):
    copy = tmp_path / "stopwords"
    shutil.copytree(data.DATA_DIR / "stopwords", copy)
    (copy / "english.txt").write_text("the\n")
    monkeypatch.setattr(data, "DATA_DIR", tmp_path)
    monkeypatch.setattr(stopwords, "MANIFEST", copy / "MANIFEST.json")
    stopwords.words.cache_clear()
    try:
        with pytest.raises(data.DataError, match="corrupt"):
            stopwords.words()
    finally:
        stopwords.words.cache_clear()
