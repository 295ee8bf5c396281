"""Parameter sets: the embedded default, merging order, and one-line validation errors."""
from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from sw_lib import config
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
     "p.yaml: detection.spike_treshold: unknown field; allowed here: prompt, spike_threshold"),
    ("colour: red\n", "p.yaml: colour: unknown field; allowed here: models, results_dir"),
    ("detection: 5\n", "p.yaml: detection: must be a mapping with fields prompt"),
    ("runtime:\n  seed: {a: 1}\n", "p.yaml: runtime.seed: must be a single value"),
    ("detection:\n  max_iterations: ten\n",
     "p.yaml: detection.max_iterations: must be an integer >= 1, got 'ten'"),
    ("detection:\n  max_iterations: 2.5\n", "detection.max_iterations: must be an integer"),
    ("detection:\n  confirm: yes please\n", "detection.confirm: must be true or false"),
    ("evaluation:\n  batch_size: true\n", "evaluation.batch_size: must be an integer >= 1"),
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
