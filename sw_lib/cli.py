"""`sw-analyze` (and `python -m sw_lib`): the batch analysis from the command line.

    sw-analyze --params params/default.yaml
    sw-analyze --models smollm2-135m ./my-model model.gguf --accuracy-samples 50 -v

Flags keep the original script's names; a flag overrides the same field of the params file,
which overrides the embedded default (params/default.yaml, which the help shows). Exit status:
0 all stages ok, 1 some stage failed (the others still ran), 2 invalid flags, parameters,
models or folders (found before any work; nothing is written) or a results folder in use by
another run, 130 interrupted (continue with --resume).
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from . import config as config_mod
from . import memory

# flag destination -> dotted field in the params tree
FIELDS = {
    "models": "models",
    "results_dir": "results_dir",
    "reports_dir": "reports_dir",
    "prompt": "detection.prompt",
    "spike_threshold": "detection.spike_threshold",
    "spike_threshold_mode": "detection.spike_threshold_mode",
    "relative_spike_factor": "detection.relative_spike_factor",
    "max_iterations": "detection.max_iterations",
    "confirm": "detection.confirm",
    "super_ratio": "detection.super_ratio",
    "control_largest": "detection.control_largest",
    "control_random": "detection.control_random",
    "reference_tokens": "detection.reference_tokens",
    "include_contributors": "evaluation.include_contributors",
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
    "tokens_per_text": "moe.tokens_per_text",
    "p_active_floor": "moe.p_active_floor",
    "co_spike_threshold": "moe.co_spike_threshold",
    "control_sets": "moe.control_sets",
    "control_match_pool": "moe.control_match_pool",
    "mechanisms": "mechanisms.run_mechanisms",
    "restore_tasks": "mechanisms.restore_tasks",
    "scaling_factors": "mechanisms.scaling_factors",
    "scaling_tasks": "mechanisms.scaling_tasks",
    "stop_word_top_k": "mechanisms.stop_word_top_k",
    "quantization": "quantization.run_quantization",
    "weight_bits": "quantization.weight_bits",
    "block_sizes": "quantization.block_sizes",
    "clip_z": "quantization.clip_z",
    "activation_bits": "quantization.activation_bits",
    "quantization_windows": "quantization.quantization_windows",
    "device": "runtime.device",
    "dtype": "runtime.dtype",
    "seed": "runtime.seed",
    "trust_remote_code": "runtime.trust_remote_code",
    "stage_timeout": "runtime.stage_timeout",
    "executor": "runtime.executor",
    "ray_address": "runtime.ray_address",
    "ray_num_cpus": "runtime.ray_num_cpus",
    "ray_num_gpus": "runtime.ray_num_gpus",
}


def _count_or_all(text: str):
    """An item count (1000, 1e3), or 'all' (no limit)."""
    value = config_mod.as_count(text)
    if value is None:
        return "all"
    if not isinstance(value, int):
        raise argparse.ArgumentTypeError(f"invalid count: '{text}' (an integer or 'all')")
    return value


def _integer(text: str) -> int:
    """An integer, also written as 1e3."""
    value = config_mod.as_count(text)
    if not isinstance(value, int):
        raise argparse.ArgumentTypeError(f"invalid integer: '{text}'")
    return value


def _token_budget(text: str):
    """A positive integer (also written as 1e3), or 'auto': the params file's own rule."""
    try:
        return memory.check_token_budget(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def _seconds(text: str):
    """Seconds, or 'none' (no limit)."""
    if text.lower() in ("none", "null"):
        return "all"  # stored as null, like a count of 'all'
    value = config_mod.as_number(text)
    if not isinstance(value, float):
        raise argparse.ArgumentTypeError(f"invalid seconds: '{text}' (a number or 'none')")
    return value


def _show_default(value) -> str:
    if isinstance(value, list):
        return " ".join(map(str, value))
    if isinstance(value, bool):
        return "on" if value else "off"
    return str(value).replace("%", "%%")


def _add_defaults(parser: argparse.ArgumentParser) -> None:
    """Append each field's default, read from params/default.yaml (the one source), to its help."""
    defaults = config_mod.defaults()
    for action in parser._actions:
        dotted = FIELDS.get(action.dest)
        if dotted is None:
            continue
        value = defaults
        for key in dotted.split("."):
            value = value[key]
        if value is not None and action.help is not argparse.SUPPRESS:
            action.help = f"{action.help or ''} (default: {_show_default(value)})".lstrip()


class _Parser(argparse.ArgumentParser):
    """Bad flags: one line, not the whole usage block."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="sw-analyze",
        description="Detect super weights, ablate them one by one and together, evaluate "
                    "perplexity and accuracy, and compare models. Runs the analysis notebooks "
                    "with papermill and writes JSON, plots and HTML reports.",
        epilog="Defaults come from the embedded params/default.yaml; see --print-config.")
    add = p.add_argument
    add("--params", metavar="FILE", help="YAML parameter set (fields of params/default.yaml)")
    add("--models", nargs="+", metavar="MODEL",
        help="models: aliases (smollm2-135m), hub ids, local folders or .gguf files")
    add("--results-dir", metavar="DIR", help="output folder")
    add("--reports-dir", metavar="DIR",
        help="folder of the HTML index (default: this project's reports/ when the results "
             "folder lies inside the project, else <results-dir>/reports)")

    g = p.add_argument_group("detection")
    g.add_argument("--prompt", help="detection prompt")
    g.add_argument("--spike-threshold", type=float, metavar="X",
                   help="activation magnitude that counts as a spike (mode absolute)")
    g.add_argument("--spike-threshold-mode", choices=config_mod.SPIKE_THRESHOLD_MODES,
                   help="absolute: above --spike-threshold; relative: above "
                        "--relative-spike-factor x the layer's median token peak (dense and MoE)")
    g.add_argument("--relative-spike-factor", type=float, metavar="X",
                   help="mode relative: a spike exceeds X times the layer's median token peak")
    g.add_argument("--max-iterations", type=_integer, metavar="N", help="detection iterations")
    g.add_argument("--confirm", action=argparse.BooleanOptionalAction, default=None,
                   help="give every candidate a verdict (super_weight, contributor, no_effect) "
                        "from zeroing it alone on a reference text, against a control of "
                        "ordinary weights; --no-confirm: no causal test, every candidate is "
                        "ablated")
    g.add_argument("--super-ratio", type=float, metavar="X",
                   help="reference perplexity ratio (zeroed / unchanged) a super weight reaches "
                        "at least, far outside the control")
    g.add_argument("--control-largest", type=_integer, metavar="K",
                   help="control: the K largest-|W| non-candidate weights of each matrix")
    g.add_argument("--control-random", type=_integer, metavar="K",
                   help="control: K random weights of each candidate's row and K of its column")
    g.add_argument("--reference-tokens", type=_integer, metavar="N",
                   help="tokens of the reference text: the end of WikiText-2 test, never "
                        "evaluated (2-1024)")

    g = p.add_argument_group("evaluation")
    g.add_argument("--perplexity-samples", type=_count_or_all, metavar="N",
                   help="WikiText-2 windows, or 'all'")
    g.add_argument("--seq-len", type=_integer, metavar="N", help="tokens per perplexity window")
    g.add_argument("--accuracy-samples", type=_count_or_all, metavar="N",
                   help="first N items per task, or 'all'")
    g.add_argument("--accuracy-tasks", nargs="+", metavar="TASK",
                   help=f"tasks: {' '.join(config_mod.TASKS)}")
    g.add_argument("--mmlu-shots", type=_integer, metavar="K", help="MMLU few-shot examples (0-5)")
    g.add_argument("--gsm8k-samples", type=_count_or_all, metavar="N",
                   help="GSM8K items (generation is slow), or 'all'")
    g.add_argument("--batch-size", type=_integer, metavar="N",
                   help="most items (questions, windows, prompts) per forward pass")
    g.add_argument("--token-budget", type=_token_budget, metavar="N|auto",
                   help="most padded tokens per forward pass; auto: half the memory free after "
                        f"the model loads, at most {memory.AUTO_CAPS['cpu']} on a CPU and "
                        f"{memory.AUTO_CAPS['cuda']} on a GPU")
    g.add_argument("--include-contributors", action=argparse.BooleanOptionalAction, default=None,
                   help="the ablation notebooks also zero the candidates with verdict "
                        "contributor (off: super weights only)")
    g.add_argument("--skip-perplexity", action="store_true", default=None,
                   help="no WikiText-2 perplexity")
    g.add_argument("--skip-accuracy", action="store_true", default=None,
                   help="no accuracy tasks")
    g.add_argument("--cache-dir", metavar="DIR",
                   help="evaluation cache folder (default: $SW_CACHE_DIR/eval, else "
                        "~/.cache/sw_lib/eval)")

    g = p.add_argument_group("mixture of experts")
    g.add_argument("--router-analysis-samples", type=_integer, metavar="N",
                   help="calibration texts: routing statistics and super experts (reference: 100)")
    g.add_argument("--tokens-per-text", type=_integer, metavar="N",
                   help="tokens per calibration text (reference: 2048)")
    g.add_argument("--p-active-floor", type=float, metavar="P",
                   help="ignore experts routed to less often than this")
    g.add_argument("--co-spike-threshold", type=float, metavar="X",
                   help="share of an expert's output spike its weight must explain")
    g.add_argument("--control-sets", type=_integer, metavar="K",
                   help="sets of frequency-matched control experts skipped instead of the "
                        "super experts")
    g.add_argument("--control-match-pool", type=_integer, metavar="K",
                   help="each control expert is drawn from the K experts of its layer nearest "
                        "the super expert's routing frequency")

    g = p.add_argument_group("mechanisms and quantization (notebooks 06, 07)")
    g.add_argument("--mechanisms", action=argparse.BooleanOptionalAction, default=None,
                   help="notebook 06: trace, restore, scaling sweep, stop words")
    g.add_argument("--restore-tasks", nargs="*", metavar="TASK",
                   help="accuracy tasks of the restore experiment (none: perplexity only)")
    g.add_argument("--scaling-factors", nargs="+", type=float, metavar="F",
                   help="factors the super weights are multiplied by")
    g.add_argument("--scaling-tasks", nargs="*", metavar="TASK",
                   help="accuracy tasks of the scaling sweep (none: perplexity only)")
    g.add_argument("--stop-word-top-k", type=_integer, metavar="K",
                   help="stop-word shift: the K tokens whose probability rose most when zeroed")
    g.add_argument("--quantization", action=argparse.BooleanOptionalAction, default=None,
                   help="notebook 07: weight and activation quantization")
    g.add_argument("--weight-bits", nargs="+", type=_integer, metavar="B",
                   help="weight bit widths (2-8)")
    g.add_argument("--block-sizes", nargs="+", metavar="N",
                   help="weight quantization block sizes: integers, row or tensor")
    g.add_argument("--clip-z", type=float, metavar="Z",
                   help="super-weight-aware clipping: mean|w| + Z std|w| per block")
    g.add_argument("--activation-bits", type=_integer, metavar="B",
                   help="down-projection input quantization bits")
    g.add_argument("--quantization-windows", type=_integer, metavar="N",
                   help="WikiText-2 windows per quantization configuration")

    g = p.add_argument_group("runtime")
    g.add_argument("--device", help="auto, cpu, cuda, cuda:N or mps")
    g.add_argument("--dtype", help="auto, float32, float16 or bfloat16")
    g.add_argument("--seed", type=_integer, help="random seed")
    g.add_argument("--trust-remote-code", action="store_true", default=None,
                   help="allow models that need their own code from the hub")
    g.add_argument("--stage-timeout", type=_seconds, metavar="SECONDS",
                   help="seconds one notebook may run before its stage fails, or 'none'")
    g.add_argument("--executor", choices=config_mod.EXECUTORS,
                   help="local: models one after another here; ray: one Ray task per model, "
                        "in parallel, on an existing Ray cluster (results folder on a shared "
                        "filesystem)")
    g.add_argument("--ray-address", metavar="HOST:PORT",
                   help="with --executor ray: the head node's address, or 'auto' (default: "
                        "RAY_ADDRESS, else the cluster started on this machine)")
    g.add_argument("--ray-num-cpus", type=float, metavar="N",
                   help="with --executor ray: CPUs each model's task asks for")
    g.add_argument("--ray-num-gpus", type=float, metavar="N",
                   help="with --executor ray: GPUs each model's task asks for (default: 1 when "
                        "the model runs on CUDA, else 0)")
    g.add_argument("--resume", nargs="?", const="latest", metavar="TIMESTAMP",
                   help="continue a run in the results folder (default: the newest); finished "
                        "stages are kept")
    g.add_argument("--no-html", action="store_true", help="skip the HTML reports and index")
    g.add_argument("--notebooks-dir", metavar="DIR", help=argparse.SUPPRESS)
    g.add_argument("--print-config", action="store_true",
                   help="print the merged, validated parameters and exit")

    out = p.add_mutually_exclusive_group()
    out.add_argument("-v", "--verbose", action="store_true", help="debug messages on the console")
    out.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors")
    _add_defaults(p)
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
    except pipeline.InputError as err:
        parser.exit(2, f"{parser.prog}: error: {err}\n")
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
