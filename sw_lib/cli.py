"""`sw-analyze` (and `python -m sw_lib`): the batch analysis from the command line.

    sw-analyze --params params/default.yaml
    sw-analyze --models smollm2-135m ./my-model model.gguf --accuracy-samples 50 -v

Flags keep the original script's names and defaults; a flag overrides the same field of the
params file, which overrides the embedded default (params/default.yaml). Exit status: 0 all
stages ok, 1 some stage failed (the others still ran), 2 invalid flags or parameters,
130 interrupted.
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from . import config as config_mod

# flag destination -> dotted field in the params tree
FIELDS = {
    "models": "models",
    "results_dir": "results_dir",
    "reports_dir": "reports_dir",
    "prompt": "detection.prompt",
    "spike_threshold": "detection.spike_threshold",
    "max_iterations": "detection.max_iterations",
    "confirm": "detection.confirm",
    "confirm_ratio": "detection.confirm_ratio",
    "reference_tokens": "detection.reference_tokens",
    "perplexity_samples": "evaluation.perplexity_samples",
    "seq_len": "evaluation.seq_len",
    "accuracy_samples": "evaluation.accuracy_samples",
    "accuracy_tasks": "evaluation.accuracy_tasks",
    "mmlu_shots": "evaluation.mmlu_shots",
    "gsm8k_samples": "evaluation.gsm8k_samples",
    "batch_size": "evaluation.batch_size",
    "token_budget": "evaluation.token_budget",
    "skip_perplexity": "evaluation.skip_perplexity",
    "skip_accuracy": "evaluation.skip_accuracy",
    "cache_dir": "evaluation.cache_dir",
    "router_analysis_samples": "moe.router_analysis_samples",
    "p_active_floor": "moe.p_active_floor",
    "co_spike_threshold": "moe.co_spike_threshold",
    "enable_causal_scoring": "moe.enable_causal_scoring",
    "device": "runtime.device",
    "dtype": "runtime.dtype",
    "seed": "runtime.seed",
    "trust_remote_code": "runtime.trust_remote_code",
}


def _count_or_all(text: str):
    """An item count, or 'all' (no limit)."""
    if text.lower() == "all":
        return "all"
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid count: '{text}' (an integer or 'all')") from None


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="sw-analyze",
        description="Detect super weights, ablate them one by one and together, evaluate "
                    "perplexity and accuracy, and compare models. Runs the analysis notebooks "
                    "with papermill and writes JSON, plots and HTML reports.",
        epilog="Defaults come from the embedded params/default.yaml; see --print-config.")
    add = p.add_argument
    add("--params", metavar="FILE", help="YAML parameter set (fields of params/default.yaml)")
    add("--models", nargs="+", metavar="MODEL",
        help="models: aliases (smollm2-135m), hub ids, local folders or .gguf files")
    add("--results-dir", metavar="DIR",
        help="output folder (default: results/comprehensive_super_weight_analysis)")
    add("--reports-dir", metavar="DIR",
        help="folder of the HTML index (default: <repository>/reports, or <results-dir>/reports)")

    g = p.add_argument_group("detection")
    g.add_argument("--prompt", help="detection prompt")
    g.add_argument("--spike-threshold", type=float, metavar="X",
                   help="activation magnitude that counts as a spike (default 50)")
    g.add_argument("--max-iterations", type=int, metavar="N", help="detection iterations (default 10)")
    g.add_argument("--confirm", action=argparse.BooleanOptionalAction, default=None,
                   help="confirm candidates by zeroing them on a reference text (default on)")
    g.add_argument("--confirm-ratio", type=float, metavar="X",
                   help="loss(zeroed)/loss(baseline) a confirmed candidate reaches (default 1.05)")
    g.add_argument("--reference-tokens", type=int, metavar="N",
                   help="WikiText-2 tokens for the confirmation (default 512)")

    g = p.add_argument_group("evaluation")
    g.add_argument("--perplexity-samples", type=_count_or_all, metavar="N",
                   help="WikiText-2 windows, or 'all'")
    g.add_argument("--seq-len", type=int, metavar="N", help="tokens per perplexity window")
    g.add_argument("--accuracy-samples", type=_count_or_all, metavar="N",
                   help="first N items per task, or 'all'")
    g.add_argument("--accuracy-tasks", nargs="+", metavar="TASK",
                   help=f"tasks: {' '.join(config_mod.TASKS)}")
    g.add_argument("--mmlu-shots", type=int, metavar="K", help="MMLU few-shot examples (0-5)")
    g.add_argument("--gsm8k-samples", type=_count_or_all, metavar="N",
                   help="GSM8K items (generation is slow), or 'all'")
    g.add_argument("--batch-size", type=int, metavar="N",
                   help="most items (questions, windows, prompts) per forward pass")
    g.add_argument("--token-budget", type=int, metavar="N",
                   help="most padded tokens per forward pass")
    g.add_argument("--skip-perplexity", action="store_true", default=None)
    g.add_argument("--skip-accuracy", action="store_true", default=None)
    g.add_argument("--cache-dir", metavar="DIR", help="evaluation cache folder")

    g = p.add_argument_group("mixture of experts")
    g.add_argument("--router-analysis-samples", type=int, metavar="N",
                   help="texts routed to measure expert usage")
    g.add_argument("--p-active-floor", type=float, metavar="P",
                   help="ignore experts routed to less often than this")
    g.add_argument("--co-spike-threshold", type=float, metavar="X")
    g.add_argument("--enable-causal-scoring", action="store_true", default=None,
                   help="confirm expert super weights and super experts by ablation")

    g = p.add_argument_group("runtime")
    g.add_argument("--device", help="auto, cpu, cuda, cuda:N or mps")
    g.add_argument("--dtype", help="auto, float32, float16 or bfloat16")
    g.add_argument("--seed", type=int)
    g.add_argument("--trust-remote-code", action="store_true", default=None,
                   help="allow models that need their own code from the hub")
    g.add_argument("--resume", action="store_true",
                   help="continue the latest run in the results folder; finished stages are kept")
    g.add_argument("--no-html", action="store_true", help="skip the HTML reports and index")
    g.add_argument("--notebooks-dir", metavar="DIR", help=argparse.SUPPRESS)
    g.add_argument("--print-config", action="store_true",
                   help="print the merged, validated parameters and exit")

    out = p.add_mutually_exclusive_group()
    out.add_argument("-v", "--verbose", action="store_true", help="debug messages on the console")
    out.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors")
    return p


def _flag(dest: str) -> str:
    return "--" + dest.replace("_", "-")


def load_config(args: argparse.Namespace) -> dict:
    """Defaults <- --params file <- flags, validated (ConfigError names the flag or field)."""
    overrides = {}
    for dest, dotted in FIELDS.items():
        value = getattr(args, dest, None)
        if value is not None:  # a flag that was given
            overrides[dotted] = None if value == "all" else value  # 'all': no limit
    flag_names = {dotted: _flag(dest) for dest, dotted in FIELDS.items()}
    return config_mod.load(args.params, overrides, flag_names)


class _ConsoleLog:
    """Progress lines on stdout while the command runs: level from -v/-q. The library logger
    is set to DEBUG so the per-model log files get everything; both are undone on exit."""

    def __init__(self, verbose: bool, quiet: bool):
        self.handler = logging.StreamHandler(sys.stdout)
        self.handler.setLevel(logging.DEBUG if verbose else logging.WARNING if quiet
                              else logging.INFO)
        self.handler.setFormatter(logging.Formatter(
            "%(asctime)s %(levelname)s %(name)s: %(message)s" if verbose else "%(message)s"))
        self.logger = logging.getLogger("sw_lib")

    def __enter__(self):
        self.level = self.logger.level
        self.logger.setLevel(logging.DEBUG)
        self.logger.addHandler(self.handler)
        return self

    def __exit__(self, *exc):
        self.logger.removeHandler(self.handler)
        self.logger.setLevel(self.level)


def main(argv: list[str] | None = None) -> int:
    from . import pipeline

    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        config = load_config(args)
    except config_mod.ConfigError as err:
        parser.exit(2, f"{parser.prog}: error: {err}\n")  # the one-line message, no usage dump
    if args.print_config:
        print(config_mod.dump(config), end="")
        return 0
    if args.notebooks_dir and not Path(args.notebooks_dir).is_dir():
        parser.exit(2, f"{parser.prog}: error: --notebooks-dir: folder '{args.notebooks_dir}' "
                       "does not exist\n")
    options = pipeline.Options(resume=args.resume, html=not args.no_html,
                               notebooks_dir=Path(args.notebooks_dir) if args.notebooks_dir else None)
    try:
        with _ConsoleLog(args.verbose, args.quiet):
            result = pipeline.run(config, options)
    except KeyboardInterrupt:
        print("interrupted; rerun with --resume to continue", file=sys.stderr)
        return 130
    print(f"results: {result.complete_json}")
    if result.index_html:
        print(f"reports: {result.index_html}")
    if result.failures:
        print(f"{len(result.failures)} stage(s) failed:", file=sys.stderr)
        for line in result.failures:
            print(f"  {line}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
