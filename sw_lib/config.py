"""Parameter sets: YAML files merged over the embedded default, validated field by field.

`params/default.yaml` (read from the source checkout when there is one, else the copy shipped
as `sw_lib/params/default.yaml`) is both the default analysis and the schema: a params file
may only use its keys (plus the few optional ones in OPTIONAL). Values are merged in this
order: defaults <- params file <- command-line flags; every value is then checked, and a bad
one raises `ConfigError` with a one-line message naming where it came from (`--spike-threshold`
or `my.yaml: detection.spike_threshold`) and what is allowed.
"""
from __future__ import annotations

import copy
import difflib
import functools
import re
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Callable

import yaml

TASKS = ("hellaswag", "arc_easy", "arc_challenge", "mmlu", "gsm8k")
DTYPES = ("auto", "float32", "float16", "bfloat16")
DTYPE_ALIASES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}
EXECUTORS = ("local", "ray")  # sw_lib.executors
SECTIONS = ("detection", "evaluation", "moe", "mechanisms", "quantization", "runtime")
SPIKE_THRESHOLD_MODES = ("absolute", "relative")  # sw_lib.spikes.MODES

# Keys the default file does not spell out; a params file may set them.
OPTIONAL: dict[str, Any] = {
    "reports_dir": None,  # where the HTML index goes; None: <repo>/reports or results_dir/reports
    "evaluation.cache_dir": None,  # evaluation cache; None: the library's default
    "runtime.trust_remote_code": False,
}


class ConfigError(ValueError):
    """A parameter is invalid; the message is one line naming the field or flag."""


# --- the default -----------------------------------------------------------------------------


def packaged_params_path() -> Path:
    """The copy of params/default.yaml shipped inside the package."""
    return Path(str(resources.files("sw_lib") / "params" / "default.yaml"))


def default_params_path() -> Path:
    """params/default.yaml of the source checkout when there is one, else the packaged copy."""
    checkout = Path(__file__).resolve().parents[1] / "params" / "default.yaml"
    return checkout if checkout.is_file() else packaged_params_path()


def defaults() -> dict:
    """The embedded default parameters, with the optional keys filled in."""
    return copy.deepcopy(_defaults())


@functools.lru_cache(maxsize=1)
def _defaults() -> dict:
    params = read_yaml(default_params_path())
    for dotted, value in OPTIONAL.items():
        _set(params, dotted, value)
    return params


def default(dotted: str):
    """One default value by its dotted field name, e.g. default("detection.spike_threshold").

    The library's keyword defaults are read through this, so params/default.yaml is the one
    place every default is written."""
    node = _defaults()
    for key in dotted.split("."):
        node = node[key]
    return copy.deepcopy(node)


# --- reading and merging ---------------------------------------------------------------------


def read_yaml(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"Params file '{path}' does not exist")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise ConfigError(f"Params file '{path}'{where}: invalid YAML ({problem})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"Params file '{path}' must hold a mapping of fields "
                          f"(models, results_dir, detection, ...), not a {type(data).__name__}")
    return data


def merge(base: dict, override: dict) -> dict:
    """A deep copy of `base` with `override` merged in (mappings recursively, lists replaced)."""
    merged = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def _set(tree: dict, dotted: str, value) -> None:
    *parents, leaf = dotted.split(".")
    for key in parents:
        tree = tree.setdefault(key, {})
    tree[leaf] = value


def _leaves(tree: dict, prefix: str = "") -> dict[str, Any]:
    out = {}
    for key, value in tree.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(_leaves(value, dotted + "."))
        else:
            out[dotted] = value
    return out


# --- field rules -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Rule:
    check: Callable[[Any], Any]  # returns the normalised value or raises ValueError(allowed)


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def as_number(v):
    """What the command line accepts as a number, from a params file too: a number, or a
    string such as '1e3' (YAML reads 1e3 without a dot as a string); anything else unchanged."""
    if isinstance(v, str):
        try:
            v = float(v.strip())
        except ValueError:
            return v
    return v


def as_count(v):
    """A count as the command line accepts it: 'all' (None, no limit), an integer, or an
    integral number such as 1e3 or 1000.0; anything else unchanged."""
    if isinstance(v, str) and v.strip().lower() == "all":
        return None
    v = as_number(v)
    if isinstance(v, float) and v.is_integer():
        return int(v)
    return v


def _int(minimum: int, maximum: int | None = None, nullable: bool = False):
    def check(v):
        v = as_count(v)
        if v is None and nullable:
            return None
        if not _is_int(v) or v < minimum or (maximum is not None and v > maximum):
            bound = f"between {minimum} and {maximum}" if maximum is not None else f">= {minimum}"
            raise ValueError(f"an integer {bound}" + (" or null (all)" if nullable else ""))
        return v
    return check


def _number(low: float, high: float | None = None, low_open: bool = False,
            nullable: bool = False):
    def check(v):
        v = as_number(v)
        if v is None and nullable:
            return None
        ok = (isinstance(v, (int, float)) and not isinstance(v, bool)
              and (v > low if low_open else v >= low) and (high is None or v <= high))
        if not ok:
            bound = (f"in [{low:g}, {high:g}]" if high is not None
                     else f"{'>' if low_open else '>='} {low:g}")
            raise ValueError(f"a number {bound}" + (" or null (no limit)" if nullable else ""))
        return float(v)
    return check


def _bool(v):
    if not isinstance(v, bool):
        raise ValueError("true or false")
    return v


def _string(nullable: bool = False):
    def check(v):
        if v is None and nullable:
            return None
        if not isinstance(v, str) or not v.strip():
            raise ValueError("a non-empty string" + (" or null" if nullable else ""))
        return v
    return check


def _models(v):
    if isinstance(v, str):
        v = [v]
    if (not isinstance(v, list) or not v
            or not all(isinstance(m, str) and m.strip() for m in v)):
        raise ValueError("a list of one or more model names (aliases, hub ids, folders or "
                         ".gguf files)")
    return v


def _tasks(v):
    if v is None:
        raise ValueError(f"a list of tasks from: {' '.join(TASKS)}")
    if isinstance(v, str):
        v = [v]
    if not isinstance(v, list) or not all(isinstance(t, str) for t in v):
        raise ValueError(f"a list of tasks from: {' '.join(TASKS)}")
    unknown = [t for t in v if t not in TASKS]
    if unknown:
        raise ValueError(f"a list of tasks from: {' '.join(TASKS)} (unknown: {' '.join(unknown)})")
    return list(dict.fromkeys(v))  # drop repeats, keep order


def _choice(choices: tuple[str, ...]):
    def check(v):
        if v not in choices:
            raise ValueError(f"one of {', '.join(choices)}")
        return v
    return check


def _factors(v):
    if isinstance(v, (int, float, str)) and not isinstance(v, bool):
        v = [v]
    v = [as_number(f) for f in v] if isinstance(v, list) else v
    if (not isinstance(v, list) or not v or not all(
            isinstance(f, (int, float)) and not isinstance(f, bool) and f == f for f in v)):
        raise ValueError("a list of one or more numbers (factors the super weights are "
                         "multiplied by, e.g. [0, 0.5, 1, 2])")
    return [float(f) for f in dict.fromkeys(v)]


def _block_sizes(v):
    if not isinstance(v, list):
        v = [v]
    v = [as_count(b) if not (isinstance(b, str) and b in ("row", "tensor")) else b for b in v]
    if not v or not all(b in ("row", "tensor") or (_is_int(b) and b >= 2) for b in v):
        raise ValueError("a list of block sizes: integers >= 2, 'row' or 'tensor'")
    return list(dict.fromkeys(v))


def _bits_list(v):
    if not isinstance(v, list):
        v = [v]
    v = [as_count(b) for b in v]
    if not v or not all(_is_int(b) and 2 <= b <= 8 for b in v):
        raise ValueError("a list of bit widths, integers from 2 to 8")
    return list(dict.fromkeys(v))


def _dtype(v):
    v = DTYPE_ALIASES.get(v, v) if isinstance(v, str) else v
    if v not in DTYPES:
        raise ValueError(f"one of {', '.join(DTYPES)}")
    return v


def _token_budget(v):
    """Padded tokens per forward pass: a positive integer, or "auto" (sized to the free memory
    once the model is loaded: memory.resolve_token_budget)."""
    if isinstance(v, str) and v.strip().lower() == "auto":
        return "auto"
    v = as_count(v)
    if not _is_int(v) or v < 1:
        raise ValueError('a positive integer or "auto"')
    return v


def _device(v):
    if not isinstance(v, str) or not re.fullmatch(r"auto|cpu|mps|cuda(:\d+)?", v):
        raise ValueError("one of auto, cpu, cuda, cuda:N, mps")
    return v


RULES: dict[str, Callable[[Any], Any]] = {
    "models": _models,
    "results_dir": _string(),
    "reports_dir": _string(nullable=True),
    "detection.prompt": _string(),
    "detection.spike_threshold": _number(0.0, low_open=True),
    "detection.spike_threshold_mode": _choice(SPIKE_THRESHOLD_MODES),
    "detection.relative_spike_factor": _number(0.0, low_open=True),
    "detection.max_iterations": _int(1),
    "detection.confirm": _bool,
    "detection.super_ratio": _number(1.0, low_open=True),
    "detection.control_largest": _int(0),
    "detection.control_random": _int(0),
    # At most the WikiText-2 tail that perplexity never evaluates (perplexity.RESERVED_TAIL_TOKENS).
    "detection.reference_tokens": _int(2, 1024),
    "evaluation.include_contributors": _bool,
    "evaluation.skip_perplexity": _bool,
    "evaluation.skip_accuracy": _bool,
    "evaluation.perplexity_samples": _int(1, nullable=True),
    "evaluation.seq_len": _int(2),
    "evaluation.accuracy_samples": _int(1, nullable=True),
    "evaluation.accuracy_tasks": _tasks,
    "evaluation.mmlu_shots": _int(0, 5),
    "evaluation.gsm8k_samples": _int(1, nullable=True),
    "evaluation.batch_size": _int(1),
    "evaluation.token_budget": _token_budget,
    "evaluation.cache_dir": _string(nullable=True),
    "moe.router_analysis_samples": _int(1),
    "moe.tokens_per_text": _int(2),
    "moe.p_active_floor": _number(0.0, 1.0),
    "moe.co_spike_threshold": _number(0.0),
    "moe.control_sets": _int(0),
    "moe.control_match_pool": _int(1),
    "mechanisms.run_mechanisms": _bool,
    "mechanisms.restore_tasks": lambda v: None if v is None else _tasks(v),
    "mechanisms.scaling_factors": _factors,
    "mechanisms.scaling_tasks": _tasks,
    "mechanisms.stop_word_top_k": _int(1),
    "quantization.run_quantization": _bool,
    "quantization.weight_bits": _bits_list,
    "quantization.block_sizes": _block_sizes,
    "quantization.clip_z": _number(0.0, low_open=True),
    "quantization.activation_bits": _int(2, 16),
    "quantization.quantization_windows": _int(1),
    "runtime.device": _device,
    "runtime.dtype": _dtype,
    "runtime.seed": _int(0),
    "runtime.trust_remote_code": _bool,
    "runtime.stage_timeout": _number(0.0, low_open=True, nullable=True),
    "runtime.executor": _choice(EXECUTORS),
    "runtime.ray_address": _string(nullable=True),
    "runtime.ray_num_cpus": _number(0.0, low_open=True),
    "runtime.ray_num_gpus": _number(0.0, nullable=True),
}


# --- validation ----------------------------------------------------------------------------


def _show(value) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def validate(params: dict, label: Callable[[str], str] = lambda dotted: dotted) -> dict:
    """Check every field of a merged parameter tree; return a normalised copy.

    `label(dotted)` names a field in error messages (a flag, or file and field).
    """
    template = defaults()
    allowed = _leaves(template)
    out = copy.deepcopy(params)
    _check_structure(out, template, "", label)
    for dotted, value in _leaves(out).items():
        if dotted not in allowed:
            raise ConfigError(f"{label(dotted)}: unknown field{_suggestion(dotted, allowed)}; "
                              f"allowed here: {_siblings(template, dotted)}")
        try:
            _set(out, dotted, RULES[dotted](value))
        except ValueError as err:
            raise ConfigError(f"{label(dotted)}: must be {err}, got {_show(value)}") from None
    return out


def _check_structure(tree: dict, template: dict, prefix: str, label) -> None:
    """Sections must be mappings and leaves must not be mappings (unknown keys name the path)."""
    for key, value in tree.items():
        dotted = f"{prefix}{key}"
        if key not in template:
            known = [f"{prefix}{k}" for k in template] + list(_leaves(defaults()))
            raise ConfigError(f"{label(dotted)}: unknown field{_suggestion(dotted, known)}; "
                              f"allowed here: {', '.join(template)}")
        if isinstance(template[key], dict):
            if not isinstance(value, dict):
                raise ConfigError(f"{label(dotted)}: must be a mapping with fields "
                                  f"{', '.join(template[key])}, got {_show(value)}")
            _check_structure(value, template[key], dotted + ".", label)
        elif isinstance(value, dict):
            raise ConfigError(f"{label(dotted)}: must be a single value, not a mapping")


def _suggestion(dotted: str, known) -> str:
    """' (did you mean X?)' for the nearest known field: the same name in another section,
    else a close spelling in the same section, else anywhere."""
    parent, _, leaf = dotted.rpartition(".")
    close = [k for k in known if k.rpartition(".")[2] == leaf and k != dotted]
    if not close:
        siblings = {k.rpartition(".")[2]: k for k in known if k.rpartition(".")[0] == parent}
        close = [siblings[m] for m in difflib.get_close_matches(leaf, list(siblings), n=1)]
    if not close:
        leaves = {k.rpartition(".")[2]: k for k in known}
        close = [leaves[m] for m in difflib.get_close_matches(leaf, list(leaves), n=1, cutoff=0.75)]
    return f" (did you mean '{close[0]}'?)" if close else ""


def _siblings(template: dict, dotted: str) -> str:
    node = template
    for key in dotted.split(".")[:-1]:
        node = node.get(key, {})
    return ", ".join(node)


def load(params_file: str | Path | None = None, overrides: dict[str, Any] | None = None,
         flag_names: dict[str, str] | None = None) -> dict:
    """Defaults <- `params_file` <- `overrides` (dotted keys, e.g. from flags), validated.

    Every key in `overrides` applies, None included (a count of None means all items).
    `flag_names` maps dotted keys to the flags that set them, so errors name the flag.
    """
    params = defaults()
    from_file: dict = {}
    if params_file is not None:
        from_file = read_yaml(params_file)
    overrides = dict(overrides or {})
    flag_names = flag_names or {}
    file_keys = set(_leaves(from_file)) | set(from_file)

    def label(dotted: str) -> str:
        if dotted in overrides:
            return flag_names.get(dotted, dotted)
        if params_file is not None and (dotted in file_keys or dotted.split(".")[0] in from_file):
            return f"{params_file}: {dotted}"
        return f"default params: {dotted}"

    _check_structure(from_file, defaults(), "", label)
    merged = merge(params, from_file)
    for dotted, value in overrides.items():
        _set(merged, dotted, value)
    return validate(merged, label)


# --- what the notebooks get ------------------------------------------------------------------


def notebook_parameters(config: dict) -> dict:
    """The flat parameter namespace the notebooks draw from (detection + evaluation + moe +
    runtime fields under their own names); the pipeline adds model, output_dir and
    run_timestamp and passes each notebook only what its parameters cell declares."""
    flat: dict[str, Any] = {}
    for section in SECTIONS:
        flat.update(config[section])
    return flat


def dump(config: dict) -> str:
    """The configuration as YAML (for --print-config and the logs)."""
    return yaml.safe_dump(config, sort_keys=False, default_flow_style=None)
