"""sw_lib.trace: the super activation found at its layer and channel, who writes it (also behind
a post-MLP norm), and the stream's readings equal to the model's own hidden states."""
from __future__ import annotations

import pytest
import torch

from sw_lib import arch, hooks, trace

import tiny
from conftest import make_tiny

PROMPT = "Apple Inc. is a worldwide tech company."
LAYER, ROW, COLUMN = 1, 37, 101


def test_stream_readings_are_the_models_hidden_states_and_sublayer_outputs(tokenizer):
    lm = make_tiny("llama", tokenizer)
    ids = tokenizer(PROMPT, return_tensors="pt").input_ids
    stream = trace.residual_stream(lm.model, ids, tokenizer)
    with torch.no_grad():
        hidden = lm.model(ids, output_hidden_states=True).hidden_states
    for i in range(stream.num_layers - 1):  # the last hidden state is after the final norm
        assert torch.equal(stream.residual_out[i], hidden[i + 1][0])
        assert torch.equal(stream.residual_in[i], hidden[i][0])
    got = {}

    def keep(name):
        def hook(module, args, output):
            got[name] = (output[0] if isinstance(output, tuple) else output)[0]
        return hook

    layers = arch.decoder_layers(lm.model)
    with hooks.attached([(layers[2].self_attn, keep("a")), (layers[2].mlp, keep("m"))]), \
            torch.no_grad():
        lm.model(ids)
    assert torch.allclose(stream.attention[2], got["a"], atol=1e-5)  # read as out - in - mlp
    assert torch.equal(stream.mlp[2], got["m"])


def test_trace_finds_the_planted_super_activation(tokenizer):
    lm = make_tiny("llama", tokenizer)
    ids = tokenizer(PROMPT, return_tensors="pt").input_ids
    tiny.plant_super_weight(lm.model, LAYER, ROW, COLUMN, ids, value=6.0)
    doc = trace.super_activation_trace(lm, PROMPT, [{"layer": LAYER, "row": ROW, "column": COLUMN}])
    assert doc["super_weight_found"] and len(doc["activations"]) == 1
    (a,) = doc["activations"]
    assert (a["origin"], a["channel"], a["token"]) == ("super_weight", ROW, 0)
    assert a["born"]["layer"] == LAYER and a["born"]["sublayer"] == "mlp"
    assert a["peak"]["layer"] >= LAYER and abs(a["peak"]["value"]) > 500
    (w,) = a["super_weights"]
    assert w["weight"] == pytest.approx(6.0)
    assert w["contribution"] == pytest.approx(6.0 * w["down_proj_input"])
    assert abs(w["down_proj_input"]) > 100  # the planted spike (~200)
    layer_row = a["layers"][LAYER]
    assert layer_row["down_proj"] == pytest.approx(w["down_proj_output"])
    assert layer_row["residual_out"] == pytest.approx(
        layer_row["residual_in"] + layer_row["attention"] + layer_row["mlp"], rel=1e-5)
    assert doc["largest_residual"]["channel"] == ROW
    assert "channel 37 at token 0" in doc["statement"] and f"layer {LAYER}" in doc["statement"]


def test_without_a_super_weight_it_traces_the_largest_activation_behind_a_post_norm(tokenizer):
    """Gemma 3: the raw down projection writes little, the post-MLP norm's gain makes it
    massive; detection finds no down-projection super weight, the trace says who writes it."""
    lm = make_tiny("gemma3_text", tokenizer, hidden_activation="relu")
    ids = tokenizer(PROMPT, return_tensors="pt").input_ids
    # the MLP channel spikes at token 0 alone; the raw write 0.1 x 200 is small
    tiny.plant_first_token_super_weight(lm.model, 2, ROW, COLUMN, ids, value=0.1)
    tiny.set_post_norm_gain(lm.model, 2, ROW, gain=400.0)
    doc = trace.super_activation_trace(lm, PROMPT, [])
    assert not doc["super_weight_found"]
    (a,) = doc["activations"]
    assert (a["origin"], a["channel"], a["token"]) == ("largest_residual", ROW, 0)
    assert (a["born"]["layer"], a["born"]["sublayer"]) == (2, "mlp")
    writer = next(w for w in a["writers"] if w["layer"] == 2)
    assert writer["through_post_norm"] and abs(writer["value"]) > 10 * abs(writer["down_proj"])
    assert doc["statement"].startswith("No super weight was detected")
    assert "through the post-MLP norm" in doc["statement"]


def test_life_and_writers_on_hand_made_readings():
    def row(i, attention, mlp, out):
        return {"layer": i, "residual_in": 0.0, "attention": attention, "mlp": mlp,
                "down_proj": mlp, "post_norm": False, "residual_out": out}
    rows = [row(0, 0.1, 0.2, 0.3), row(1, 0.0, 900.0, 900.3), row(2, 5.0, 100.0, 1005.3),
            row(3, 0.0, -10.0, 995.3), row(4, -990.0, 0.0, 5.3), row(5, 0.0, 0.0, 5.3)]
    life = trace.life(rows)
    assert life["peak"] == {"layer": 2, "value": 1005.3}
    assert life["born"]["layer"] == 1 and life["born"]["sublayer"] == "mlp"
    assert life["persists_through"] == 3
    assert life["ends"] == {"layer": 4, "sublayer": "attention", "value_after": 5.3}
    assert [(w["layer"], w["sublayer"]) for w in trace.writers(rows)] == [(1, "mlp")]
    assert trace._layers([3, 4, 5, 8]) == "layers 3-5, 8"
