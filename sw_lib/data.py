"""The evaluation data: bundled copies first (sha256-verified), the Hugging Face Hub on request.

Split names are the keys of `data/MANIFEST.json` ("hellaswag/validation", "mmlu/test",
"wikitext-2-raw-v1/test", ...). `load_split(name)` returns the rows as dicts in the hub schema
(WikiText-2 rows are `{"text": line}`, as the hub gives them). `select_items(name, n)` picks the
items an evaluation uses (DESIGN section 6): the first n rows of the split, except MMLU, which
takes n round-robin over its subjects (sorted by name; rows within a subject in file order).
Each item keeps its row index in the split as `doc_id`, so cached results stay addressable.
"""
from __future__ import annotations

import gzip
import hashlib
import json
from collections import defaultdict
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

DATA_DIR = Path(__file__).parent / "data"
REINSTALL = "reinstall sw-lib (pip install --force-reinstall sw-lib) or pass source='hub'"


class DataError(RuntimeError):
    """Evaluation data could not be loaded; the message is one line that says what to do."""


@dataclass(frozen=True)
class HubSplit:
    path: str
    config: str | None
    split: str


# Where each bundled split lives on the Hugging Face Hub (source="hub").
HUB: dict[str, HubSplit] = {
    "wikitext-2-raw-v1/test": HubSplit("Salesforce/wikitext", "wikitext-2-raw-v1", "test"),
    "hellaswag/validation": HubSplit("Rowan/hellaswag", None, "validation"),
    "ai2_arc/ARC-Easy/test": HubSplit("allenai/ai2_arc", "ARC-Easy", "test"),
    "ai2_arc/ARC-Challenge/test": HubSplit("allenai/ai2_arc", "ARC-Challenge", "test"),
    "mmlu/test": HubSplit("cais/mmlu", "all", "test"),
    "mmlu/dev": HubSplit("cais/mmlu", "all", "dev"),
    "gsm8k/test": HubSplit("openai/gsm8k", "main", "test"),
    "gsm8k/train": HubSplit("openai/gsm8k", "main", "train"),
}
WIKITEXT = "wikitext-2-raw-v1/test"


@dataclass
class Selection:
    """The items an evaluation uses: (doc_id, row) pairs plus how they were chosen."""

    split: str
    items: list[tuple[int, dict]]
    n_requested: int | None
    n_available: int
    source: str
    info: dict = field(default_factory=dict)

    @property
    def capped(self) -> bool:
        return self.n_requested is not None and self.n_requested > self.n_available

    @property
    def doc_ids(self) -> list[int]:
        return [doc_id for doc_id, _ in self.items]

    def summary(self) -> dict:
        return {"split": self.split, "source": self.source, "n_requested": self.n_requested,
                "n_available": self.n_available, "n_selected": len(self.items),
                "capped": self.capped, **self.info}


# --- bundled copies -----------------------------------------------------------------------


def manifest(data_dir: str | Path | None = None) -> dict:
    path = Path(data_dir or DATA_DIR) / "MANIFEST.json"
    if not path.is_file():
        raise DataError(f"Bundled data manifest {path} is missing; {REINSTALL}")
    return json.loads(path.read_text())


def splits() -> list[str]:
    return sorted(HUB)


def _entry(name: str, data_dir: str | Path | None) -> dict:
    entries = manifest(data_dir)
    if name not in entries:
        raise DataError(f"Unknown data split '{name}'; known splits: {', '.join(sorted(entries))}")
    return entries[name]


def _lines(text: str) -> list[str]:
    """Lines split at "\n" only, each keeping it (str.splitlines also splits at U+2028 etc.)."""
    parts = text.split("\n")
    return [p + "\n" for p in parts[:-1]] + ([parts[-1]] if parts[-1] else [])


def _decode(name: str, text: str) -> list[dict]:
    if name == WIKITEXT:
        # The hub's rows are the file's lines with their newline; blank lines are empty rows.
        return [{"text": line if line.strip() else ""} for line in _lines(text)]
    return [json.loads(line) for line in _lines(text) if line.strip()]


@lru_cache(maxsize=32)
def _read_verified(path: str, mtime_ns: int, size: int, sha256: str, name: str) -> tuple[dict, ...]:
    """Decompress, check the sha256 of the uncompressed bytes, parse (memoised per file state)."""
    try:
        raw = gzip.decompress(Path(path).read_bytes())
    except (OSError, EOFError) as err:
        raise DataError(f"Bundled data file {path} is corrupt ({type(err).__name__}); "
                        f"{REINSTALL}") from None
    if hashlib.sha256(raw).hexdigest() != sha256:
        raise DataError(f"Bundled data file {path} is corrupt (sha256 of its contents does not "
                        f"match MANIFEST.json); {REINSTALL}")
    return tuple(_decode(name, raw.decode("utf-8")))


def _load_bundled(name: str, data_dir: str | Path | None) -> list[dict]:
    entry = _entry(name, data_dir)
    path = Path(data_dir or DATA_DIR) / entry["file"]
    if not path.is_file():
        raise DataError(f"Bundled data file {path} is missing; {REINSTALL}")
    stat = path.stat()
    rows = _read_verified(str(path), stat.st_mtime_ns, stat.st_size,
                          entry["sha256_uncompressed"], name)
    expected = entry.get("rows", entry.get("lines"))
    if expected is not None and len(rows) != expected:
        raise DataError(f"Bundled data file {path} has {len(rows)} rows, MANIFEST.json says "
                        f"{expected}; {REINSTALL}")
    return list(rows)


# --- the hub ------------------------------------------------------------------------------


def _normalise_arc(row: dict) -> dict:
    """Hub ARC rows label some choices 1-5; the bundled copy (and lm-eval's prompts) use A-E."""
    to_letter = {str(i): "ABCDE"[i - 1] for i in range(1, 6)}
    labels = [to_letter.get(label, label) for label in row["choices"]["label"]]
    return {**row, "choices": {"text": list(row["choices"]["text"]), "label": labels},
            "answerKey": to_letter.get(row["answerKey"], row["answerKey"])}


def _load_hub(name: str) -> list[dict]:
    if name not in HUB:
        raise DataError(f"Unknown data split '{name}'; known splits: {', '.join(splits())}")
    hub = HUB[name]
    label = f"{hub.path}" + (f" ({hub.config})" if hub.config else "") + f", split {hub.split}"
    try:
        import datasets

        ds = datasets.load_dataset(hub.path, hub.config, split=hub.split)
    except Exception as err:  # network, auth, missing dataset: all end the same way for a user
        first = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise DataError(f"Could not load dataset {label} from the Hugging Face Hub ({first}); "
                        "use source='bundled' (the offline copy shipped with sw-lib)") from None
    rows = [dict(row) for row in ds]
    if name.startswith("ai2_arc/"):
        rows = [_normalise_arc(row) for row in rows]
    return rows


# --- public -------------------------------------------------------------------------------


def load_split(name: str, source: str = "bundled", data_dir: str | Path | None = None) -> list[dict]:
    """All rows of split `name` from the bundled copy (verified) or from the hub."""
    if source == "bundled":
        return _load_bundled(name, data_dir)
    if source == "hub":
        return _load_hub(name)
    raise DataError(f"Unknown data source '{source}'; use 'bundled' or 'hub'")


def wikitext_rows(source: str = "bundled", data_dir: str | Path | None = None) -> list[str]:
    """WikiText-2 raw test rows exactly as the hub gives them."""
    return [row["text"] for row in load_split(WIKITEXT, source, data_dir)]


def round_robin(rows: list[dict], n: int | None, key: str = "subject") -> list[int]:
    """Row indices taken round-robin over groups (sorted by name), file order within a group."""
    groups: dict[str, list[int]] = defaultdict(list)
    for index, row in enumerate(rows):
        groups[row[key]].append(index)
    ordered = [groups[name] for name in sorted(groups)]
    picked: list[int] = []
    depth = 0
    limit = len(rows) if n is None else min(n, len(rows))
    while len(picked) < limit:
        for group in ordered:
            if depth < len(group):
                picked.append(group[depth])
                if len(picked) == limit:
                    break
        depth += 1
    return picked


def select_items(name: str, n: int | None = None, source: str = "bundled",
                 data_dir: str | Path | None = None) -> Selection:
    """The first `n` items of a split (MMLU: round-robin over subjects); None takes all.

    Asking for more than the split holds takes them all; `Selection.capped` says so.
    """
    if n is not None and n < 1:
        raise ValueError(f"number of items must be at least 1, got {n}")
    rows = load_split(name, source, data_dir)
    info: dict = {}
    if name.startswith("mmlu/"):
        indices = round_robin(rows, n)
        subjects = sorted({rows[i]["subject"] for i in indices})
        info = {"selection": "round-robin over subjects", "subjects": len(subjects)}
    else:
        indices = list(range(len(rows) if n is None else min(n, len(rows))))
        info = {"selection": "first n"}
    return Selection(split=name, items=[(i, rows[i]) for i in indices], n_requested=n,
                     n_available=len(rows), source=source, info=info)
