"""The explorer (notebooks/00_explorer.ipynb): its computations against direct ones, its widgets
driven from Python on a tiny model with a planted super weight, and the notebook under
papermill."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from sw_lib import ablate, arch, explorer

import tiny
from conftest import assert_bit_identical, make_tiny, weights_snapshot

ROOT = Path(__file__).resolve().parents[1]
PLANTED = (1, 7, 11)  # layer, row, column


@pytest.fixture(scope="module")
def planted(tokenizer, prompt_ids):
    lm = make_tiny("llama", tokenizer, seed=1)
    tiny.plant_super_weight(lm.model, *PLANTED, prompt_ids)
    return lm


def test_spikes_point_at_the_planted_weight(planted):
    spikes = explorer.layer_spikes(planted, "Apple Inc. is a worldwide tech company.")
    assert [s["layer"] for s in spikes if s["spike"]] == [PLANTED[0]]
    hit = spikes[PLANTED[0]]
    assert (hit["output_channel"], hit["input_channel"]) == PLANTED[1:]
    ex = explorer.Explorer(planted)
    assert ex.candidates() == [dict(zip(("layer", "row", "column"), PLANTED))]


def test_channel_by_token_magnitudes_are_the_down_projection_input(planted, prompt_ids):
    m = explorer.channel_token_magnitudes(planted, "Apple Inc. is a worldwide tech company.",
                                          PLANTED[0], "input", top=5)
    assert PLANTED[2] in m["channels"] and len(m["tokens"]) == prompt_ids.shape[1]
    seen = {}

    def record(module, args, output):
        seen["x"] = args[0][0].abs()

    handle = arch.down_proj(planted.model, PLANTED[0]).register_forward_hook(record)
    with torch.no_grad():
        planted.model(prompt_ids)
    handle.remove()
    column = m["channels"].index(PLANTED[2])
    assert m["values"][column] == pytest.approx(seen["x"][:, PLANTED[2]].tolist())
    with pytest.raises(ValueError, match="side must be"):
        explorer.channel_token_magnitudes(planted, "x y", 0, "middle")


def test_scale_zero_equals_zeroing_and_scale_one_restores_bits(planted):
    snapshot = weights_snapshot(planted.model)
    ex = explorer.Explorer(planted)
    first = ex.set_weight(*PLANTED)
    assert first.scale == 1.0 and first.loss == first.baseline_loss
    zero = ex.set_scale(0.0)
    with ablate.zeroed(planted.model, [PLANTED]):
        expected_loss = explorer.text_loss(planted, ex.text)
        expected_tokens = explorer.next_token_distribution(planted, ex.prompt)
    ex.set_scale(0.0)  # the block above restored the weight; zero it again
    assert zero.loss == pytest.approx(expected_loss, abs=1e-6) and zero.loss != zero.baseline_loss
    assert [t for t, _ in zero.next_tokens] == [t for t, _ in expected_tokens]
    double = ex.set_scale(2.0)
    matrix = arch.down_proj_matrix(planted.model, PLANTED[0])
    assert matrix[PLANTED[1], PLANTED[2]] == 2 * snapshot[_key(planted, PLANTED[0])][PLANTED[1], PLANTED[2]]
    assert double.loss != zero.loss
    back = ex.set_scale(1.0)
    assert back.loss == back.baseline_loss
    assert_bit_identical(planted.model, snapshot)
    with pytest.raises(ValueError, match="between 0 and 3"):
        ex.set_scale(3.5)


def _key(lm, layer: int) -> str:
    matrix = arch.down_proj_matrix(lm.model, layer)
    return next(k for k, v in lm.model.state_dict().items() if v.data_ptr() == matrix.data_ptr())


def test_widgets_driven_from_python_restore_the_weight_when_moving_on(planted):
    snapshot = weights_snapshot(planted.model)
    ex = explorer.Explorer(planted)
    ui = explorer.build_ui(ex)
    assert ui["layer"].value == PLANTED[0]  # opens on the spiking layer
    assert ui["weight"].value == PLANTED and ex.weight.label == "L1 [7, 11]"
    ui["scale"].value = 0.0  # the slider's callback scales the weight
    matrix = arch.down_proj_matrix(planted.model, PLANTED[0])
    assert matrix[PLANTED[1], PLANTED[2]] == 0
    zeroed = ex.reading()
    assert f"{zeroed.baseline_loss:.3f} → {zeroed.loss:.3f}" in ui["status"].value
    assert f"{zeroed.loss:.3f} at this scale" in ui["figures"]["reading"]._suptitle.get_text()
    ui["layer"].value = 3  # another layer: its own weight is offered; picking it moves on
    other = [v for _, v in ui["weight"].options if v[0] == 3][0]
    ui["weight"].value = other
    assert ui["scale"].value == 1.0 and ex.weight.layer == 3
    assert_bit_identical(planted.model, snapshot)  # the scaled planted weight was restored
    ui["scale"].value = 3.0
    ui["prompt"].value = "Paris is a city."  # a new prompt restores as well
    assert_bit_identical(planted.model, snapshot)
    ex.restore()
    assert_bit_identical(planted.model, snapshot)


def test_model_picker_loads_and_restores_the_previous_model(planted, tokenizer):
    snapshot = weights_snapshot(planted.model)
    other = make_tiny("qwen2", tokenizer, seed=2)
    ex = explorer.Explorer(planted)
    ui = explorer.build_ui(ex, models=["other"], load=lambda spec: other)
    ui["scale"].value = 0.0
    ui["model"].value = "other"
    assert ex.lm is other and ui["scale"].value == 1.0
    assert_bit_identical(planted.model, snapshot)
    ex.restore()


def test_explorer_notebook_runs_headless_under_papermill(tmp_path, tokenizer, prompt_ids):
    """00_explorer.ipynb top to bottom on a tiny planted model (a folder), as papermill runs
    it: the widgets render their initial state and the last cell confirms the restore."""
    import papermill

    model = tiny.tiny_model("llama", vocab_size=len(tokenizer), seed=1)
    tiny.plant_super_weight(model, *PLANTED, prompt_ids)
    folder = tiny.save_tiny(model, tokenizer, tmp_path / "tiny-llama")
    out = tmp_path / "explorer.ipynb"
    papermill.execute_notebook(str(ROOT / "notebooks" / "00_explorer.ipynb"), str(out),
                               parameters={"model": str(folder), "device": "cpu"},
                               kernel_name="python3", progress_bar=False,
                               cwd=str(ROOT / "notebooks"))
    nb = json.loads(out.read_text())
    text = "".join("".join(o.get("text", "")) + "".join(o.get("data", {}).get("text/plain", ""))
                   for c in nb["cells"] if c["cell_type"] == "code" for o in c["outputs"])
    assert "spiking layers: [1]" in text and "restored bit-exactly: True" in text
    assert any("application/vnd.jupyter.widget-view+json" in o.get("data", {})
               for c in nb["cells"] if c["cell_type"] == "code" for o in c["outputs"])
