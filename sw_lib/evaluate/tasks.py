"""Declarative task specs: which split, which prompt, which metrics (DESIGN section 6).

Each protocol lives here once, written to match lm-evaluation-harness 0.4.x so numbers are
comparable. A spec turns a data row into a request: a multiple-choice request (context, choice
texts, gold index; each choice is scored as the continuation " " + choice) or a generation
request (context, gold answer). Bump `version` whenever a prompt or metric changes: it is part
of every cache key.
"""
from __future__ import annotations

import random
import re
from dataclasses import asdict, dataclass
from typing import Callable

# lm-eval's default separator between a prompt and its answer (target_delimiter).
TARGET_DELIMITER = " "
FEWSHOT_DELIMITER = "\n\n"


class UnknownTaskError(KeyError):
    """A task name that is not in TASKS."""

    def __str__(self) -> str:  # KeyError would print the repr of its argument
        return str(self.args[0])


@dataclass(frozen=True)
class MCRequest:
    doc_id: int
    context: str
    choices: tuple[str, ...]  # choice texts; scored as TARGET_DELIMITER + choice
    gold: int


@dataclass(frozen=True)
class GenRequest:
    doc_id: int
    context: str
    gold: str  # the reference answer as stored (GSM8K: full solution ending "#### n")


@dataclass(frozen=True)
class TaskSpec:
    name: str
    split: str
    output: str  # "multiple_choice" | "generate_until"
    metrics: tuple[str, ...]
    primary_metric: str
    build: Callable[[dict, int, list[dict]], MCRequest | GenRequest] = None  # (row, doc_id, shots)
    default_shots: int = 0
    fewshot_split: str | None = None
    fewshot_by: str | None = None  # rows of the few-shot split must match the doc on this field
    # How exemplars are drawn (lm-eval's samplers): "first_n" takes the first rows (of the same
    # `fewshot_by` group); "default" draws them at random, seeded once, per item in turn.
    fewshot_sampler: str = "first_n"
    fewshot_seed: int = 1234  # lm-eval's default fewshot_random_seed
    version: int = 1
    until: tuple[str, ...] = ()
    max_gen_toks: int = 256
    description: str = ""

    def key(self, shots: int) -> dict:
        """What a cached result depends on (the build function is covered by `version`)."""
        fields = {k: v for k, v in asdict(self).items() if k not in ("build", "description")}
        return {**fields, "shots": shots}


# --- HellaSwag ----------------------------------------------------------------------------


def hellaswag_preprocess(text: str) -> str:
    """lm-eval's HellaSwag cleanup: strip, " [title]" -> ". ", drop [...] spans, fix spaces."""
    text = text.strip()
    text = text.replace(" [title]", ". ")
    text = re.sub("\\[.*?\\]", "", text)
    text = text.replace("  ", " ")
    return text


def _hellaswag(row: dict, doc_id: int, shots: list[dict]) -> MCRequest:
    ctx = row["ctx_a"] + " " + row["ctx_b"].capitalize()
    return MCRequest(doc_id, hellaswag_preprocess(row["activity_label"] + ": " + ctx),
                     tuple(hellaswag_preprocess(e) for e in row["endings"]), int(row["label"]))


# --- ARC ----------------------------------------------------------------------------------


def _arc(row: dict, doc_id: int, shots: list[dict]) -> MCRequest:
    labels = list(row["choices"]["label"])
    return MCRequest(doc_id, f"Question: {row['question']}\nAnswer:",
                     tuple(row["choices"]["text"]), labels.index(row["answerKey"]))


# --- MMLU ---------------------------------------------------------------------------------

LETTERS = ("A", "B", "C", "D")


def mmlu_description(subject: str) -> str:
    return ("The following are multiple choice questions (with answers) about "
            f"{subject.replace('_', ' ')}.\n\n")


def mmlu_question(row: dict) -> str:
    c = row["choices"]
    return (f"{row['question'].strip()}\nA. {c[0]}\nB. {c[1]}\nC. {c[2]}\nD. {c[3]}\nAnswer:")


def mmlu_prompt(row: dict, shots: list[dict]) -> str:
    """Description, k solved dev questions (" {letter}\\n\\n" after each), then the question."""
    examples = "".join(mmlu_question(s) + TARGET_DELIMITER + LETTERS[int(s["answer"])]
                       + FEWSHOT_DELIMITER for s in shots)
    return mmlu_description(row["subject"]) + examples + mmlu_question(row)


def _mmlu(row: dict, doc_id: int, shots: list[dict]) -> MCRequest:
    return MCRequest(doc_id, mmlu_prompt(row, shots), LETTERS, int(row["answer"]))


# --- GSM8K --------------------------------------------------------------------------------

GSM8K_STRICT = re.compile(r"#### (\-?[0-9\.\,]+)")
GSM8K_FLEXIBLE = re.compile(r"(-?[$0-9.,]{2,})|(-?[0-9]+)")
GSM8K_IGNORE = (",", "\\$", "(?s).*#### ", "\\.$")
INVALID = "[invalid]"


def gsm8k_prompt(row: dict, shots: list[dict]) -> str:
    examples = [f"Question: {s['question']}\nAnswer: {s['answer']}" for s in shots]
    return FEWSHOT_DELIMITER.join(examples + [f"Question: {row['question']}\nAnswer:"])


def _gsm8k(row: dict, doc_id: int, shots: list[dict]) -> GenRequest:
    return GenRequest(doc_id, gsm8k_prompt(row, shots), row["answer"])


def _first_match(pattern: re.Pattern, text: str, select: int) -> str:
    """lm-eval's RegexFilter: findall, pick one match, first non-empty group, strip."""
    matches = pattern.findall(text)
    if not matches:
        return INVALID
    match = matches[select]
    if isinstance(match, tuple):
        match = next((m for m in match if m), INVALID)
    return match.strip()


def extract_strict(text: str) -> str:
    """The number after the first "#### " (GSM8K's answer format), else "[invalid]"."""
    return _first_match(GSM8K_STRICT, text, 0)


def extract_flexible(text: str) -> str:
    """The last number-like span of the text, else "[invalid]"."""
    return _first_match(GSM8K_FLEXIBLE, text, -1)


def normalize_answer(text: str) -> str:
    """lm-eval's exact_match for GSM8K: drop ',', '$', everything up to '#### ', a final '.'."""
    for pattern in GSM8K_IGNORE:
        text = re.sub(pattern, "", text)
    return text.lower()


GSM8K_EXTRACTORS: dict[str, Callable[[str], str]] = {
    "strict-match": extract_strict,
    "flexible-extract": extract_flexible,
}


# --- registry -----------------------------------------------------------------------------

TASKS: dict[str, TaskSpec] = {
    "hellaswag": TaskSpec("hellaswag", "hellaswag/validation", "multiple_choice",
                          ("acc", "acc_norm"), "acc_norm", _hellaswag,
                          description="HellaSwag validation, 0-shot, lm-eval preprocessing"),
    "arc_easy": TaskSpec("arc_easy", "ai2_arc/ARC-Easy/test", "multiple_choice",
                         ("acc", "acc_norm"), "acc_norm", _arc,
                         description="ARC-Easy test, 0-shot"),
    "arc_challenge": TaskSpec("arc_challenge", "ai2_arc/ARC-Challenge/test", "multiple_choice",
                              ("acc", "acc_norm"), "acc_norm", _arc,
                              description="ARC-Challenge test, 0-shot"),
    "mmlu": TaskSpec("mmlu", "mmlu/test", "multiple_choice", ("acc",), "acc", _mmlu,
                     default_shots=0, fewshot_split="mmlu/dev", fewshot_by="subject",
                     description="MMLU test (57 subjects, round-robin), k-shot from dev"),
    "gsm8k": TaskSpec("gsm8k", "gsm8k/test", "generate_until",
                      ("strict-match", "flexible-extract"), "strict-match", _gsm8k,
                      default_shots=5, fewshot_split="gsm8k/train", fewshot_sampler="default",
                      version=2, until=("Question:", "</s>", "<|im_end|>"), max_gen_toks=256,
                      description="GSM8K test, 5-shot (lm-eval's seeded draw from train per "
                                  "item), greedy"),
}


def get_task(task: str | TaskSpec) -> TaskSpec:
    """A TaskSpec from a name (or the spec itself, e.g. one made with dataclasses.replace)."""
    if isinstance(task, TaskSpec):
        return task
    if task not in TASKS:
        raise UnknownTaskError(f"Unknown task '{task}'; known tasks: {', '.join(TASKS)}")
    return TASKS[task]


def fewshot_rows(spec: TaskSpec, items: list[tuple[int, dict]], shots: int,
                 pool: list[dict]) -> dict[int, list[dict]]:
    """The few-shot exemplars of each (doc_id, row) item, by doc_id, as lm-eval 0.4.13 picks them.

    "first_n": the first `shots` rows of the pool (of the item's `fewshot_by` group).
    "default" (lm-eval's ContextSampler): one `random.Random(fewshot_seed)` for the task, and
    for each test document in turn `rnd.sample(pool, shots)`; so item i's exemplars are the
    i-th draw and depend on i (and only on i: every draw before it is replayed), as with
    lm-eval's `--limit`, which evaluates the first documents in order.
    """
    if shots == 0:
        return {doc_id: [] for doc_id, _ in items}
    if spec.fewshot_split is None:
        raise ValueError(f"task '{spec.name}' has no bundled few-shot split; use shots=0")
    if spec.fewshot_sampler == "first_n":
        return {doc_id: _first_rows(spec, row, shots, pool) for doc_id, row in items}
    if spec.fewshot_sampler != "default":
        raise ValueError(f"task '{spec.name}': unknown few-shot sampler '{spec.fewshot_sampler}'")
    if len(pool) < shots:
        raise ValueError(f"task '{spec.name}': {shots}-shot needs {shots} few-shot rows, "
                         f"only {len(pool)} exist")
    if spec.fewshot_split == spec.split:  # lm-eval would also drop the document itself
        raise ValueError(f"task '{spec.name}': random exemplars from the evaluated split itself "
                         "are not supported")
    wanted = {doc_id for doc_id, _ in items}
    rnd = random.Random(spec.fewshot_seed)
    drawn = {}
    for doc_id in range(max(wanted) + 1):
        exemplars = rnd.sample(pool, shots)
        if doc_id in wanted:
            drawn[doc_id] = exemplars
    return drawn


def _first_rows(spec: TaskSpec, row: dict, shots: int, pool: list[dict]) -> list[dict]:
    if spec.fewshot_by:
        pool = [r for r in pool if r[spec.fewshot_by] == row[spec.fewshot_by]]
    if len(pool) < shots:
        raise ValueError(f"task '{spec.name}': {shots}-shot needs {shots} few-shot rows, "
                         f"only {len(pool)} exist")
    return pool[:shots]
