"""`sw-analyze` end to end: real notebooks on tiny models with planted super weights, and the
flag validation that stops a run before it starts."""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from sw_lib import cli, results, tiny

REPO = Path(__file__).resolve().parents[1]
NOTEBOOKS = [REPO / "notebooks" / f"{s}.ipynb" for s in
             (*results.MODEL_STAGES[:3], results.COMPARISON_STAGE)]
FIGURE = re.compile(r'<img [^>]*src="data:image/png;base64,')
PLANTED = {"tiny-llama": ("llama", 1, 7, 11), "tiny-qwen2": ("qwen2", 2, 20, 30)}
TINY_RUN = ["--perplexity-samples", "1", "--seq-len", "32", "--accuracy-samples", "2",
            "--accuracy-tasks", "arc_easy", "--no-confirm", "--max-iterations", "3",
            "--device", "cpu", "--dtype", "float32", "-q"]

needs_notebooks = pytest.mark.skipif(
    not all(p.is_file() for p in NOTEBOOKS),
    reason="needs the real notebooks 01-03 and 05 in notebooks/ (written in parallel)")


@pytest.fixture(scope="module")
def cli_run(tmp_path_factory, tokenizer, prompt_ids):
    """sw-analyze over two tiny models (llama, qwen2), each with one planted super weight."""
    tmp = tmp_path_factory.mktemp("cli")
    specs = []
    for name, (model_type, layer, row, column) in PLANTED.items():
        model = tiny.tiny_model(model_type, vocab_size=len(tokenizer), seed=1)
        tiny.plant_super_weight(model, layer, row, column, prompt_ids)
        specs.append(str(tiny.save_tiny(model, tokenizer, tmp / name)))
    results_dir = tmp / "results"
    with pytest.MonkeyPatch.context() as env:
        # Tiny models run faster on one thread; the notebook kernels inherit this.
        env.setenv("OMP_NUM_THREADS", "1")
        code = cli.main(["--models", *specs, "--results-dir", str(results_dir),
                         "--cache-dir", str(tmp / "eval-cache"), *TINY_RUN])
    ts = results.latest_timestamp(results_dir)
    return code, results_dir, ts


@needs_notebooks
def test_two_models_whole_tree(cli_run):
    code, root, ts = cli_run
    assert code == 0
    assert (root / f"complete_analysis_{ts}.json").is_file()
    assert (root / "summary_plots" / "model_comparison.png").stat().st_size > 10_000
    for slug in PLANTED:
        m = results.ModelPaths(root / slug, ts)
        expected = [m.analysis_json, m.detection_json, m.combined_json, m.individual_json(0),
                    m.log_file, *(m.plots / f for f in (
                        "detection_iterations.png", "super_weight_distribution.png",
                        "impact_comparison.png", "combined_analysis.png"))]
        expected += [m.notebook(s) for s in results.MODEL_STAGES[:3]]
        expected += [m.report(s) for s in results.MODEL_STAGES[:3]]
        missing = [str(p.relative_to(root)) for p in expected if not p.is_file()]
        assert not missing, missing
    # one timestamp for every timestamped file of the run
    stamps = {m.group(1) for p in root.rglob("*") if (m := results._TS.search(p.name))}
    assert stamps == {ts}


@needs_notebooks
def test_json_valid_and_planted_weights_found(cli_run):
    code, root, ts = cli_run
    complete = results.read_json(root / f"complete_analysis_{ts}.json")
    assert results.validation_errors(complete) == []
    assert complete["status"] == "ok" and [m["slug"] for m in complete["models"]] == list(PLANTED)
    summaries = {m["slug"]: m for m in complete["comparison"]["models"]}
    for slug, (model_type, layer, row, column) in PLANTED.items():
        analysis = results.read_json(results.ModelPaths(root / slug, ts).analysis_json)
        assert results.validation_errors(analysis) == []
        assert analysis["family"] == model_type and analysis["status"] == "ok"
        found = [(w["layer"], w["row"], w["column"]) for w in analysis["detection"]["super_weights"]]
        assert found == [(layer, row, column)]
        assert analysis["resolved_runtime"] == {"dtype": "float32", "device": "cpu"}
        cfg = analysis["config"]
        assert cfg["evaluation"]["accuracy_tasks"] == ["arc_easy"]
        assert cfg["detection"]["confirm"] is False and cfg["runtime"]["dtype"] == "float32"
        # the combined ablation's numbers are what the comparison reports
        ratio = analysis["combined"]["perplexity_impact"]["perplexity_ratio"]
        assert ratio is not None and summaries[slug]["perplexity_ratio"] == ratio
        assert summaries[slug]["super_weights"][0]["relative_depth"] == layer / 4
        assert set(summaries[slug]["accuracy_drops"]) == {"arc_easy"}


@needs_notebooks
def test_html_reports_contain_figures_and_index_links_them(cli_run):
    code, root, ts = cli_run
    figures = {"01_detection": 2, "02_individual_ablation": 1, "03_combined_ablation": 1}
    for slug in PLANTED:
        m = results.ModelPaths(root / slug, ts)
        for stage, n in figures.items():
            assert len(FIGURE.findall(m.report(stage).read_text())) >= n, (slug, stage)
    comparison = results.RunPaths(root, ts).report().read_text()
    assert len(FIGURE.findall(comparison)) == 1
    index = (root / "reports" / "index.html").read_text()
    for slug in PLANTED:
        assert f'href="../{slug}/reports/03_combined_ablation_{ts}.html"' in index


def test_bad_model_exits_nonzero_with_error_recorded(tmp_path, capsys):
    """Only the comparison notebook runs: the model never resolves."""
    results_dir = tmp_path / "results"
    code = cli.main(["--models", str(tmp_path / "no-such-model"), "--results-dir",
                     str(results_dir), "-q"])
    assert code == 1
    err = capsys.readouterr().err
    assert "no-such-model" in err and "does not exist" in err
    complete = results.read_json(next(results_dir.glob("complete_analysis_*.json")))
    assert results.validation_errors(complete) == []
    assert complete["status"] == "failed"
    assert "does not exist" in complete["models"][0]["error"]


@pytest.mark.parametrize("argv, message", [
    (["--spike-threshold", "-1"], "--spike-threshold: must be a number > 0, got -1.0"),
    (["--spike-threshold", "abc"], "argument --spike-threshold: invalid float value: 'abc'"),
    (["--max-iterations", "0"], "--max-iterations: must be an integer >= 1, got 0"),
    (["--accuracy-samples", "-3"], "--accuracy-samples: must be an integer >= 1 or null (all)"),
    (["--perplexity-samples", "many"], "argument --perplexity-samples: invalid count: 'many'"),
    (["--accuracy-tasks", "hellaswag", "winogrande"],
     "--accuracy-tasks: must be a list of tasks from: hellaswag arc_easy arc_challenge mmlu "
     "gsm8k (unknown: winogrande)"),
    (["--p-active-floor", "2"], "--p-active-floor: must be a number in [0, 1], got 2.0"),
    (["--router-analysis-samples", "-1"], "--router-analysis-samples: must be an integer >= 1"),
    (["--dtype", "fp8"], "--dtype: must be one of auto, float32, float16, bfloat16, got 'fp8'"),
    (["--device", "tpu"], "--device: must be one of auto, cpu, cuda, cuda:N, mps, got 'tpu'"),
    (["--mmlu-shots", "9"], "--mmlu-shots: must be an integer between 0 and 5, got 9"),
    (["--params", "/nonexistent/p.yaml"], "Params file '/nonexistent/p.yaml' does not exist"),
    (["--models"], "argument --models: expected at least one argument"),
    (["-v", "-q"], "argument -q/--quiet: not allowed with argument -v/--verbose"),
])
def test_invalid_flags_are_rejected_naming_the_flag(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main(argv + ["--print-config"])
    assert exit_.value.code == 2
    assert message in capsys.readouterr().err


def test_yaml_errors_name_the_field_and_flags_override_yaml(tmp_path, capsys):
    params = tmp_path / "p.yaml"
    params.write_text("detection:\n  max_iterations: -2\n")
    with pytest.raises(SystemExit):
        cli.main(["--params", str(params), "--print-config"])
    assert f"{params}: detection.max_iterations: must be an integer >= 1, got -2" in \
        capsys.readouterr().err
    # the flag wins over the file, so the same file is fine with --max-iterations
    assert cli.main(["--params", str(params), "--max-iterations", "4", "--print-config"]) == 0
    assert "max_iterations: 4" in capsys.readouterr().out
    params.write_text("models: [a]\nevaluation:\n  accuracy_samples: 7\n")
    args = cli.build_parser().parse_args(["--params", str(params), "--accuracy-samples", "all",
                                          "--skip-perplexity", "--models", "b", "c"])
    cfg = cli.load_config(args)
    assert cfg["models"] == ["b", "c"] and cfg["evaluation"]["accuracy_samples"] is None
    assert cfg["evaluation"]["skip_perplexity"] is True
    assert cfg["evaluation"]["skip_accuracy"] is False  # not given: the default stays


def test_every_config_field_has_a_flag():
    from sw_lib import config

    assert set(cli.FIELDS.values()) == set(config.RULES)
    parser = cli.build_parser()
    for original in ("--models", "--spike-threshold", "--max-iterations", "--perplexity-samples",
                     "--accuracy-samples", "--accuracy-tasks", "--results-dir",
                     "--skip-perplexity", "--skip-accuracy", "--verbose", "--quiet",
                     "--router-analysis-samples", "--p-active-floor", "--co-spike-threshold",
                     "--enable-causal-scoring", "--params", "--device", "--dtype", "--resume"):
        assert original in parser._option_string_actions, original


def test_python_dash_m_entry_point():
    out = subprocess.run([sys.executable, "-m", "sw_lib", "--models", "x", "--print-config"],
                         capture_output=True, text=True, cwd=REPO, timeout=60)
    assert out.returncode == 0 and "models: [x]" in out.stdout
