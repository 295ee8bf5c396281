"""Bundled evaluation data: checksums, one-line errors, item selection, the hub path."""
from __future__ import annotations

import gzip
import json
import os
import shutil
import subprocess
import sys
from collections import defaultdict

import pytest

from sw_lib import data
from sw_lib.data import DataError


def test_every_bundled_split_loads_with_the_manifest_row_count():
    manifest = data.manifest()
    assert sorted(manifest) == data.splits()
    for name, entry in manifest.items():
        rows = data.load_split(name)
        assert len(rows) == entry.get("rows", entry.get("lines")), name
    assert data.load_split("hellaswag/validation")[0]["activity_label"] == "Roof shingle removal"
    assert {r["answerKey"] for r in data.load_split("ai2_arc/ARC-Challenge/test")} <= set("ABCDE")


def test_wikitext_rows_are_the_hub_rows():
    rows = data.wikitext_rows()
    assert len(rows) == 4358
    # Blank lines (" \n" in the raw file) are empty rows; others keep their newline.
    assert rows[:3] == ["", " = Robert Boulter = \n", ""]
    raw = gzip.decompress((data.DATA_DIR / "wikitext/wiki.test.raw.gz").read_bytes()).decode()
    assert "".join(r if r else " \n" for r in rows) == raw


def _copy_data(tmp_path, *names):
    """A private copy of the manifest and the named splits' files."""
    target = tmp_path / "data"
    manifest = data.manifest()
    for name in names:
        dest = target / manifest[name]["file"]
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(data.DATA_DIR / manifest[name]["file"], dest)
    shutil.copy(data.DATA_DIR / "MANIFEST.json", target / "MANIFEST.json")
    return target, manifest


def test_corrupted_copy_fails_with_one_line_naming_the_file(tmp_path):
    target, manifest = _copy_data(tmp_path, "ai2_arc/ARC-Easy/test")
    path = target / manifest["ai2_arc/ARC-Easy/test"]["file"]
    assert len(data.load_split("ai2_arc/ARC-Easy/test", data_dir=target)) == 2376  # intact copy

    # One changed character, still valid gzip and JSON: only the checksum catches it.
    text = gzip.decompress(path.read_bytes()).decode().replace("photosynthesis", "photosynthesiz", 1)
    path.write_bytes(gzip.compress(text.encode()))
    with pytest.raises(DataError) as err:
        data.load_split("ai2_arc/ARC-Easy/test", data_dir=target)
    message = str(err.value)
    assert "\n" not in message and str(path) in message
    assert "sha256" in message and "reinstall" in message

    path.write_bytes(path.read_bytes()[:100])  # truncated download
    with pytest.raises(DataError, match="corrupt.*reinstall"):
        data.load_split("ai2_arc/ARC-Easy/test", data_dir=target)

    path.unlink()
    with pytest.raises(DataError, match=r"ARC-Easy/test\.jsonl\.gz is missing; reinstall"):
        data.load_split("ai2_arc/ARC-Easy/test", data_dir=target)


def test_unknown_split_and_source():
    with pytest.raises(DataError, match="Unknown data split 'hellaswag/train'.*mmlu/test"):
        data.load_split("hellaswag/train")
    with pytest.raises(DataError, match="Unknown data source 'web'"):
        data.load_split("mmlu/test", source="web")


def test_first_n_items_and_capping():
    sel = data.select_items("ai2_arc/ARC-Challenge/test", 5)
    rows = data.load_split("ai2_arc/ARC-Challenge/test")
    assert sel.doc_ids == [0, 1, 2, 3, 4]
    assert [row for _, row in sel.items] == rows[:5]
    assert not sel.capped and sel.summary()["n_selected"] == 5

    capped = data.select_items("ai2_arc/ARC-Challenge/test", 5000)
    summary = capped.summary()
    assert capped.capped and summary["capped"] is True
    assert summary["n_requested"] == 5000 and summary["n_available"] == summary["n_selected"] == 1172
    assert len(data.select_items("gsm8k/test").items) == 1319  # None takes all, not capped
    with pytest.raises(ValueError, match="at least 1"):
        data.select_items("gsm8k/test", 0)


def test_mmlu_round_robin_over_sorted_subjects():
    rows = data.load_split("mmlu/test")
    by_subject = defaultdict(list)
    for i, row in enumerate(rows):
        by_subject[row["subject"]].append(i)
    subjects = sorted(by_subject)
    assert len(subjects) == 57

    sel = data.select_items("mmlu/test", 60)
    ids = sel.doc_ids
    # The first pass takes each subject's first row, in sorted subject order ...
    assert ids[:57] == [by_subject[s][0] for s in subjects]
    # ... the second pass their second rows, in the same order.
    assert ids[57:] == [by_subject[s][1] for s in subjects[:3]]
    assert sel.summary()["subjects"] == 57

    # Small subjects run out: over all rows, each subject's rows stay in file order.
    everything = data.select_items("mmlu/test", 20000)
    assert everything.capped and sorted(everything.doc_ids) == list(range(len(rows)))
    for s in subjects:
        assert [i for i in everything.doc_ids if rows[i]["subject"] == s] == by_subject[s]


def test_hub_source_offline_fails_with_one_line_naming_the_dataset(tmp_path):
    # A fresh interpreter in offline mode fails at once instead of retrying for ~25 s.
    code = ("from sw_lib import data\n"
            "try:\n    data.load_split('hellaswag/validation', source='hub')\n"
            "except data.DataError as e:\n    print('ERROR:' + str(e))\n")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "HF_HOME": str(tmp_path / "hf")}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                         timeout=120, cwd=os.path.dirname(os.path.dirname(__file__)))
    lines = [line for line in out.stdout.splitlines() if line.startswith("ERROR:")]
    assert len(lines) == 1, out.stdout + out.stderr
    assert "Rowan/hellaswag" in lines[0] and "source='bundled'" in lines[0]


def test_hub_arc_labels_are_normalised_to_letters():
    row = {"id": "x", "question": "q", "choices": {"text": ["a", "b", "c"], "label": ["1", "2", "3"]},
           "answerKey": "2"}
    fixed = data._normalise_arc(row)
    assert fixed == {"id": "x", "question": "q", "answerKey": "B",
                     "choices": {"text": ["a", "b", "c"], "label": ["A", "B", "C"]}}
    assert json.loads(json.dumps(fixed)) == fixed  # still plain JSON, nothing lost
    already = {**fixed, "choices": dict(fixed["choices"])}
    assert data._normalise_arc(already) == fixed  # letters stay letters
