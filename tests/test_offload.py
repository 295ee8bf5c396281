"""A model whose layers accelerate offloads to disk (device_map): detection finds the planted
super weight at its coordinates, and edits reach the offloaded weights and are undone bit for
bit (the weights the forward pass reads, and the logits)."""
from __future__ import annotations

import pytest
import torch
from accelerate import dispatch_model

from sw_lib import ablate, arch, detect, models, offload
from sw_lib.edits import WeightEdit

import tiny

LAYER, ROW, COLUMN = 2, 37, 101


def _offloaded(tokenizer, prompt_ids, folder):
    model = tiny.tiny_model("llama", vocab_size=len(tokenizer))
    tiny.plant_super_weight(model, layer=LAYER, row=ROW, column=COLUMN, input_ids=prompt_ids)
    reference = {k: v.clone() for k, v in model.state_dict().items()}
    device_map = {"model.embed_tokens": "cpu", "model.rotary_emb": "cpu", "model.norm": "cpu",
                  "lm_head": "cpu", "model.layers.0": "cpu"}
    device_map.update({f"model.layers.{i}": "disk"
                       for i in range(1, model.config.num_hidden_layers)})
    model = dispatch_model(model, device_map=device_map, offload_dir=str(folder))
    return models.from_model(model, tokenizer, name="tiny-offloaded"), reference


@pytest.mark.slow  # a full-vocabulary tiny model written to disk and read back every pass
def test_offloaded_layers_detection_and_bit_exact_edits(tokenizer, prompt_ids, tmp_path):
    lm, reference = _offloaded(tokenizer, prompt_ids, tmp_path / "offload")
    down = arch.down_proj(lm.model, LAYER)
    assert offload.is_offloaded(down.weight)  # on the meta device: loaded by a hook
    assert torch.equal(arch.down_proj_matrix(lm.model, LAYER), reference[
        f"model.layers.{LAYER}.mlp.down_proj.weight"])
    with torch.no_grad():
        before = lm.model(prompt_ids).logits

    result = detect.detect_super_weights(lm, confirm_candidates=False)
    assert [(c["layer"], c["row"], c["column"]) for c in result.candidates] == \
        [(LAYER, ROW, COLUMN)]

    with ablate.edited(lm.model, [WeightEdit(LAYER, ROW, COLUMN)]):
        assert arch.down_proj_matrix(lm.model, LAYER)[ROW, COLUMN] == 0
        with torch.no_grad():
            zeroed = lm.model(prompt_ids).logits
    assert not torch.equal(zeroed, before)  # the forward pass read the edited weight
    with torch.no_grad():
        assert torch.equal(lm.model(prompt_ids).logits, before)
    state = offload.state_tensors(lm.model)
    assert state.keys() == reference.keys()
    assert all(torch.equal(state[k], reference[k]) for k in reference)  # bit-exact
    assert models.fingerprint(lm.model) == lm.fingerprint
