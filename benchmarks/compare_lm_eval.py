"""Agreement with lm-evaluation-harness 0.4.x on the same items (lm-eval is an optional extra).

For each multiple-choice task, the items the engine selects are written to a JSONL file and
lm-eval reads them through a custom task (`dataset_path: json`) whose prompt is its own
task's (HellaSwag through lm-eval's own `process_docs`; MMLU as one task whose description is
templated per subject). Both run on the same loaded model. Printed per task: identical prompts
(lm-eval's context + continuation strings against ours), identical per-item choices (acc,
acc_norm), largest log-likelihood difference, the aggregate difference, and the time ratio.

    .venv/bin/pip install lm-eval==0.4.13      # once (optional extra `lmeval`)
    .venv/bin/python benchmarks/compare_lm_eval.py --items 50
"""
from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch: no spinning on busy cores

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from sw_lib import data  # noqa: E402
from sw_lib.evaluate import TASKS, run_task  # noqa: E402
from sw_lib.evaluate.engine import build_requests  # noqa: E402

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


def write_task(folder: Path, task: str, rows: list[dict]) -> str:
    """A JSONL file of the selected rows and an lm-eval task YAML that reads it."""
    name = f"sw_{task}"
    jsonl = folder / f"{name}.jsonl"
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in rows))
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


def lm_eval_run(lm, folder: Path, name: str, batch_size: int) -> tuple[list[dict], float]:
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    model = HFLM(pretrained=lm.model, tokenizer=lm.tokenizer, batch_size=batch_size)
    start = time.perf_counter()
    out = simple_evaluate(model=model, tasks=[name], task_manager=TaskManager(include_path=str(folder)),
                          num_fewshot=0, log_samples=True, verbosity="ERROR")
    seconds = time.perf_counter() - start
    return sorted(out["samples"][name], key=lambda s: s["doc_id"]), seconds


def compare(task: str, ours: dict, samples: list[dict], requests: list) -> dict:
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--items", type=int, default=50)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--tasks", nargs="+", default=["hellaswag", "arc_easy", "arc_challenge", "mmlu"])
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    args = parser.parse_args()
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    try:
        import lm_eval
    except ImportError:
        raise SystemExit("lm-eval is not installed: .venv/bin/pip install lm-eval==0.4.13") from None
    from sw_lib.models import load_model

    lm = load_model(args.model)
    print(f"model {args.model} ({lm.fingerprint[:12]}), lm-eval {lm_eval.__version__}, "
          f"{args.items} items per task, batch {args.batch_size}, 0-shot, "
          f"threads {args.threads or 'default'}")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        for task in args.tasks:
            spec = TASKS[task]
            selection = data.select_items(spec.split, args.items)
            requests = build_requests(spec, selection.items, 0)
            start = time.perf_counter()
            ours = run_task(lm, task, args.items, cache=False, batch_size=args.batch_size,
                            progress=False)
            ours_seconds = time.perf_counter() - start
            name = write_task(folder, task, [row for _, row in selection.items])
            samples, theirs_seconds = lm_eval_run(lm, folder, name, args.batch_size)
            row = compare(task, ours, samples, requests)
            row.update(task=task, ours_seconds=ours_seconds, theirs_seconds=theirs_seconds)
            rows.append(row)
            print(json.dumps(row), flush=True)

    print()
    print(f"{'task':<15}{'n':>4}{'same prompt':>13}{'same choice':>13}{'max |dLL|':>11}"
          f"{'metric':>10}{'ours':>8}{'lm-eval':>9}{'diff':>8}{'ours s':>8}{'lm-eval s':>10}{'ratio':>7}")
    for r in rows:
        metric = TASKS[r["task"]].primary_metric
        diff = r["ours"][metric] - r["theirs"][metric]
        print(f"{r['task']:<15}{r['n']:>4}{r['same_prompt']:>13}{r['same_choice']:>13}"
              f"{r['max_ll_diff']:>11.1e}{metric:>10}{r['ours'][metric]:>8.3f}"
              f"{r['theirs'][metric]:>9.3f}{diff:>+8.3f}{r['ours_seconds']:>8.1f}"
              f"{r['theirs_seconds']:>10.1f}{r['theirs_seconds'] / r['ours_seconds']:>6.1f}x")


if __name__ == "__main__":
    main()
