"""Parameter sets: the embedded default, merging order, and one-line validation errors."""
from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from sw_lib import config, stages
from sw_lib.config import ConfigError

REPO = Path(__file__).resolve().parents[1]


def write(tmp_path: Path, text: str, name: str = "p.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_default_is_params_default_yaml_plus_optional_fields():
    repo_default = yaml.safe_load((REPO / "params" / "default.yaml").read_text())
    loaded = config.load()
    assert {k: v for k, v in loaded.items() if k != "reports_dir"} == {
        **repo_default,
        "evaluation": {**repo_default["evaluation"], "cache_dir": None},
        "runtime": {**repo_default["runtime"], "trust_remote_code": False}}
    assert loaded["reports_dir"] is None


def test_packaged_copy_matches_the_repository_default():
    packaged = yaml.safe_load(config.packaged_params_path().read_text())
    repo_default = yaml.safe_load((REPO / "params" / "default.yaml").read_text())
    assert packaged == repo_default, ("sw_lib/params/default.yaml is out of date: "
                                      "cp params/default.yaml sw_lib/params/default.yaml")


def test_quick_params_change_only_sizes_and_stay_smaller_than_the_default():
    """params/quick.yaml (the smoke run) validates and shrinks every evaluation size."""
    quick, default = config.load(REPO / "params" / "quick.yaml"), config.load()
    changed = {k for k in quick["evaluation"] if quick["evaluation"][k] != default["evaluation"][k]}
    assert changed <= {"perplexity_samples", "accuracy_samples", "accuracy_tasks", "gsm8k_samples"}
    for size in ("perplexity_samples", "accuracy_samples", "gsm8k_samples"):
        assert quick["evaluation"][size] < default["evaluation"][size], size
    assert {k: v for k, v in quick.items() if k != "evaluation"} == \
        {k: v for k, v in default.items() if k != "evaluation"}


def test_default_sizes_have_power():
    """Issue 9: the default run evaluates enough items to resolve a change of a few points."""
    ev = config.load()["evaluation"]
    assert ev["accuracy_samples"] >= 300 and ev["perplexity_samples"] >= 16
    assert ev["seq_len"] == 2048 and ev["gsm8k_samples"] >= 40
    assert {"hellaswag", "arc_easy", "arc_challenge", "mmlu", "gsm8k"} <= set(ev["accuracy_tasks"])


def test_file_overrides_default_and_flags_override_file(tmp_path):
    path = write(tmp_path, "models: [a, b]\ndetection:\n  spike_threshold: 70\n"
                           "evaluation:\n  accuracy_tasks: [mmlu]\n  perplexity_samples: null\n")
    cfg = config.load(path, {"detection.spike_threshold": 80.0, "models": ["c"]})
    assert cfg["models"] == ["c"]
    assert cfg["detection"]["spike_threshold"] == 80.0
    assert cfg["detection"]["max_iterations"] == 10  # untouched default
    assert cfg["evaluation"]["accuracy_tasks"] == ["mmlu"]  # lists replace, not extend
    assert cfg["evaluation"]["perplexity_samples"] is None  # null: all windows
    cfg = config.load(path)
    assert cfg["models"] == ["a", "b"] and cfg["detection"]["spike_threshold"] == 70.0


def test_normalisation(tmp_path):
    cfg = config.load(write(tmp_path, "models: smollm2-135m\nruntime:\n  dtype: bf16\n"
                                      "evaluation:\n  accuracy_tasks: [mmlu, mmlu, gsm8k]\n"))
    assert cfg["models"] == ["smollm2-135m"]
    assert cfg["runtime"]["dtype"] == "bfloat16"
    assert cfg["evaluation"]["accuracy_tasks"] == ["mmlu", "gsm8k"]
    assert isinstance(cfg["detection"]["spike_threshold"], float)


@pytest.mark.parametrize("text, message", [
    ("detection:\n  spike_treshold: 3\n",
     "p.yaml: detection.spike_treshold: unknown field (did you mean 'detection.spike_threshold'?);"
     " allowed here: prompt, spike_threshold"),
    ("detection:\n  accuracy_samples: 3\n", "p.yaml: detection.accuracy_samples: unknown field "
     "(did you mean 'evaluation.accuracy_samples'?)"),
    ("evaluaton:\n  seq_len: 3\n", "p.yaml: evaluaton: unknown field (did you mean 'evaluation'?)"),
    ("spike_threshold: 3\n",
     "p.yaml: spike_threshold: unknown field (did you mean 'detection.spike_threshold'?)"),
    ("colour: red\n", "p.yaml: colour: unknown field; allowed here: models, results_dir"),
    ("detection:\n  max_iterations: all\n",
     "detection.max_iterations: must be an integer >= 1, got 'all'"),
    ("detection:\n  max_iterations: 1.5e0\n", "detection.max_iterations: must be an integer"),
    ("runtime:\n  stage_timeout: 0\n",
     "runtime.stage_timeout: must be a number > 0 or null (no limit), got 0"),
    ("detection: 5\n", "p.yaml: detection: must be a mapping with fields prompt"),
    ("runtime:\n  seed: {a: 1}\n", "p.yaml: runtime.seed: must be a single value"),
    ("detection:\n  max_iterations: ten\n",
     "p.yaml: detection.max_iterations: must be an integer >= 1, got 'ten'"),
    ("detection:\n  max_iterations: 2.5\n", "detection.max_iterations: must be an integer"),
    ("detection:\n  confirm: yes please\n", "detection.confirm: must be true or false"),
    ("evaluation:\n  batch_size: true\n", "evaluation.batch_size: must be an integer >= 1"),
    ("evaluation:\n  token_budget: lots\n",
     "p.yaml: evaluation.token_budget: must be a positive integer or \"auto\", got 'lots'"),
    ("evaluation:\n  token_budget: 0\n",
     "evaluation.token_budget: must be a positive integer or \"auto\", got 0"),
    ("evaluation:\n  accuracy_samples: -5\n",
     "evaluation.accuracy_samples: must be an integer >= 1 or null (all), got -5"),
    ("evaluation:\n  gsm8k_samples: 0\n", "evaluation.gsm8k_samples: must be an integer >= 1"),
    ("evaluation:\n  mmlu_shots: 6\n", "evaluation.mmlu_shots: must be an integer between 0 and 5"),
    ("evaluation:\n  accuracy_tasks: [hellaswag, piqa]\n",
     "evaluation.accuracy_tasks: must be a list of tasks from: hellaswag arc_easy arc_challenge "
     "mmlu gsm8k (unknown: piqa)"),
    ("moe:\n  p_active_floor: 1.5\n", "moe.p_active_floor: must be a number in [0, 1], got 1.5"),
    ("detection:\n  spike_threshold: 0\n", "detection.spike_threshold: must be a number > 0"),
    ("runtime:\n  device: gpu\n", "runtime.device: must be one of auto, cpu, cuda, cuda:N, mps"),
    ("runtime:\n  dtype: int8\n", "runtime.dtype: must be one of auto, float32, float16, bfloat16"),
    ("models: []\n", "p.yaml: models: must be a list of one or more model names"),
    ("results_dir: ''\n", "results_dir: must be a non-empty string"),
])
def test_invalid_fields_name_file_and_field(tmp_path, text, message):
    with pytest.raises(ConfigError) as err:
        config.load(write(tmp_path, text))
    assert message in str(err.value)
    assert "\n" not in str(err.value)
    assert str(err.value).startswith(str(tmp_path / "p.yaml"))


def test_flag_errors_name_the_flag():
    with pytest.raises(ConfigError, match=r"^--max-iterations: must be an integer >= 1, got -1$"):
        config.load(None, {"detection.max_iterations": -1},
                    {"detection.max_iterations": "--max-iterations"})


def test_file_problems(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        config.load(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match=r"p.yaml' line 2: invalid YAML"):
        config.load(write(tmp_path, "models: [a\nresults_dir: x: y\n"))
    with pytest.raises(ConfigError, match="must hold a mapping"):
        config.load(write(tmp_path, "- a\n- b\n"))
    assert config.load(write(tmp_path, "")) == config.load()  # empty file: all defaults


def test_notebook_parameters_are_flat_and_complete():
    cfg = config.load()
    flat = config.notebook_parameters(cfg)
    for section in config.SECTIONS:
        for key, value in cfg[section].items():
            assert flat[key] == value
    assert len(flat) == sum(len(cfg[s]) for s in config.SECTIONS)  # no name is in two sections


def test_every_field_has_a_rule():
    leaves = config._leaves(config.defaults())
    assert set(leaves) == set(config.RULES)


def test_params_file_accepts_what_the_command_line_accepts(tmp_path):
    """'all' for counts and 1e3 for numbers (YAML reads 1e3 without a dot as a string), as
    sw-analyze --accuracy-samples all --perplexity-samples 1e3 --spike-threshold 1e3 does."""
    from sw_lib import cli

    cfg = config.load(write(tmp_path, "evaluation:\n  accuracy_samples: all\n"
                                      "  perplexity_samples: 1e3\n  gsm8k_samples: ALL\n"
                                      "  batch_size: 1.6e1\ndetection:\n  spike_threshold: 1e3\n"
                                      "runtime:\n  stage_timeout: 3.6e3\n"))
    assert cfg["evaluation"]["accuracy_samples"] is None
    assert cfg["evaluation"]["gsm8k_samples"] is None
    assert cfg["evaluation"]["perplexity_samples"] == 1000
    assert isinstance(cfg["evaluation"]["perplexity_samples"], int)
    assert cfg["evaluation"]["batch_size"] == 16
    assert cfg["detection"]["spike_threshold"] == 1000.0
    assert cfg["runtime"]["stage_timeout"] == 3600.0
    args = cli.build_parser().parse_args(
        ["--accuracy-samples", "all", "--perplexity-samples", "1e3", "--gsm8k-samples", "ALL",
         "--batch-size", "1.6e1", "--spike-threshold", "1e3", "--stage-timeout", "3.6e3"])
    from_flags = cli.load_config(args)
    for dotted in ("evaluation.accuracy_samples", "evaluation.perplexity_samples",
                   "evaluation.gsm8k_samples", "evaluation.batch_size",
                   "detection.spike_threshold", "runtime.stage_timeout"):
        section, key = dotted.split(".")
        assert from_flags[section][key] == cfg[section][key], dotted
    no_limit = cli.load_config(cli.build_parser().parse_args(["--stage-timeout", "none"]))
    assert no_limit["runtime"]["stage_timeout"] is None


def _parameters_cell_values(notebook: Path) -> dict:
    """Names and literal values assigned in a notebook's parameters cell."""
    import ast

    from sw_lib import runner

    cell = runner.parameters_cell(notebook)
    assert cell is not None, f"{notebook.name} has no cell tagged 'parameters'"
    values = {}
    for node in ast.parse(cell.source).body:
        if isinstance(node, ast.Assign) and isinstance(node.targets[0], ast.Name):
            try:
                values[node.targets[0].id] = ast.literal_eval(node.value)
            except ValueError:
                pass  # an expression, not a default to compare
    return values


@pytest.mark.parametrize("stage", [s.name for s in stages.STAGES])
def test_every_notebook_parameters_cell_agrees_with_default_params(stage):
    """One source of defaults: a notebook run by hand (no papermill) uses the values of
    params/default.yaml for every parameter the two share."""
    defaults = config.defaults()
    shared = {**config.notebook_parameters(defaults), "model": defaults["models"][0]}
    values = _parameters_cell_values(REPO / "notebooks" / f"{stage}.ipynb")
    mismatches = {k: {"notebook": values[k], "params/default.yaml": shared[k]}
                  for k in sorted(values.keys() & shared.keys()) if values[k] != shared[k]}
    assert mismatches == {}


def test_token_budget_auto_or_integer_from_file_and_flag_to_study_settings(tmp_path):
    """"auto" (the default) and integers, from the params file or --token-budget, reach the
    study settings the notebooks build as they were given."""
    from sw_lib import cli, study

    assert config.default("evaluation.token_budget") == "auto"
    assert study.StudySettings().token_budget == "auto"
    for text, expected in (("auto", "auto"), ("AUTO", "auto"), ("2048", 2048), ("2e3", 2000)):
        from_file = config.load(write(tmp_path, f"evaluation:\n  token_budget: {text}\n"))
        from_flag = cli.load_config(cli.build_parser().parse_args(["--token-budget", text]))
        for cfg in (from_file, from_flag):
            assert cfg["evaluation"]["token_budget"] == expected, text
            params = config.notebook_parameters(cfg)  # what papermill gives each notebook
            assert study.StudySettings.from_dict(params).token_budget == expected, text
    over = cli.load_config(cli.build_parser().parse_args(
        ["--params", str(write(tmp_path, "evaluation:\n  token_budget: 512\n")),
         "--token-budget", "auto"]))
    assert over["evaluation"]["token_budget"] == "auto"  # the flag overrides the file
    for bad in ("big", "0", "-3", "2.5"):  # the params file's rule, at parse time
        with pytest.raises(SystemExit):
            cli.build_parser().parse_args(["--token-budget", bad])
