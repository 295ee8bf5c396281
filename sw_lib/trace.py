"""Super activation trace: one residual channel at one token, through every layer.

One forward pass on a prompt records, per decoder layer and for the first sequence (float32):
what enters the layer (`residual_in`), what the attention writes into the residual stream,
the residual after it, what the MLP writes (through the post-MLP norm where the family has
one, Gemma 2/3: `mlp`; the raw down projection output as `down_proj`), and what leaves the
layer (`residual_out`). The attention write is read as residual_out - residual_in - MLP
write: exact for every residual block (sequential or parallel), with no family-specific
attention names.

A traced activation says who writes it, where it is born, where it peaks and where it ends.
`peak`: the largest |residual_out| over the layers. `writers`: the sublayer writes up to the
peak, with the peak's sign, of at least MASSIVE_FRACTION x the largest of them (one write for a
super weight; several for an activation built up over layers); it is `born` at the first
writer. It is *massive* while |residual_out| >= MASSIVE_FRACTION x |peak|: from the peak on
until `persists_through`; it `ends` in the next layer (None: massive to the last layer), by
the sublayer that moved it most against its sign there.

`super_activation_trace` traces the activation each super weight creates: channel = the
weight's row, token = where the weight's down projection writes that row most. Weights that
write the same (channel, token) share one trace. A model without a (dense) super weight gets
the trace of its largest residual activation over every layer and token instead, with the
sublayers that write it; the statement says so plainly.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from . import arch, hooks

MASSIVE_FRACTION = 0.5  # of the peak: where an activation counts as massive (born, ends)
SUBLAYERS = ("attention", "mlp")


@dataclass
class Stream:
    """Per layer, [tokens, channels] float32 tensors of the first sequence."""

    tokens: list[str]
    residual_in: list[torch.Tensor]
    attention: list[torch.Tensor]
    mlp: list[torch.Tensor]  # what the MLP adds to the residual (after a post-MLP norm)
    down_proj: list[torch.Tensor | None]  # raw down projection output (None: MoE layer)
    down_proj_in: list[torch.Tensor | None]
    residual_out: list[torch.Tensor]
    post_norm: list[bool]  # the MLP write passed a post-MLP norm

    @property
    def num_layers(self) -> int:
        return len(self.residual_out)


def _first(output) -> torch.Tensor:
    return output[0] if isinstance(output, tuple) else output


def _mlp_module(model: torch.nn.Module, layer: int) -> torch.nn.Module:
    """The MLP (or MoE block) of a layer: the parent of its down projection path."""
    family = arch.family_of(model)
    path = family.moe.block if arch.is_moe_layer(model, layer) else family.down_proj.rsplit(".", 1)[0]
    return arch.decoder_layers(model)[layer].get_submodule(path)


@torch.no_grad()
def residual_stream(model: torch.nn.Module, input_ids: torch.Tensor, tokenizer=None) -> Stream:
    """One forward pass recording every layer's residual readings (first sequence, float32)."""
    n = arch.num_layers(model)
    got: dict[tuple[str, int], torch.Tensor] = {}

    def keep(name: str, layer: int, which: str = "output"):
        def hook(module, args, kwargs, output):
            if which == "input":
                value = args[0] if args else kwargs["hidden_states"]
            else:
                value = _first(output)
            got[(name, layer)] = value[0].detach().float().cpu()
        return hook

    pairs = []
    for layer, block in enumerate(arch.decoder_layers(model)):
        pairs += [(block, keep("in", layer, "input")), (block, keep("out", layer))]
        norm = arch.post_mlp_norm(model, layer)
        pairs.append((norm if norm is not None else _mlp_module(model, layer), keep("mlp", layer)))
        if not arch.is_moe_layer(model, layer):
            down = arch.down_proj(model, layer)
            pairs += [(down, keep("down", layer)), (down, keep("down_in", layer, "input"))]
    device = next(model.parameters()).device
    with hooks.attached(pairs, kind="forward_kwargs"):
        model(input_ids.to(device))

    residual_in = [got[("in", i)] for i in range(n)]
    residual_out = [got[("out", i)] for i in range(n)]
    mlp = [got[("mlp", i)] for i in range(n)]
    attention = [o - r - m for r, o, m in zip(residual_in, residual_out, mlp)]
    ids = input_ids[0].tolist()
    return Stream(
        tokens=[tokenizer.decode([t]) for t in ids] if tokenizer is not None else [str(t) for t in ids],
        residual_in=residual_in, attention=attention, mlp=mlp,
        down_proj=[got.get(("down", i)) for i in range(n)],
        down_proj_in=[got.get(("down_in", i)) for i in range(n)],
        residual_out=residual_out,
        post_norm=[arch.post_mlp_norm(model, i) is not None for i in range(n)])


# --- one channel at one token -----------------------------------------------------------------


def readings(stream: Stream, token: int, channel: int) -> list[dict]:
    """Per layer: the channel's value entering, written by each sublayer, and leaving."""
    rows = []
    for i in range(stream.num_layers):
        value_in = float(stream.residual_in[i][token, channel])
        attention = float(stream.attention[i][token, channel])
        down = stream.down_proj[i]
        rows.append({"layer": i, "residual_in": value_in, "attention": attention,
                     "after_attention": value_in + attention,
                     "mlp": float(stream.mlp[i][token, channel]),
                     "down_proj": None if down is None else float(down[token, channel]),
                     "post_norm": stream.post_norm[i],
                     "residual_out": float(stream.residual_out[i][token, channel])})
    return rows


def _moved_most(row: dict, direction: float) -> str:
    """The sublayer whose write moved the channel most along `direction` (+1 or -1)."""
    return max(SUBLAYERS, key=lambda s: direction * row[s])


def writers(rows: list[dict], fraction: float = MASSIVE_FRACTION) -> list[dict]:
    """The sublayer writes that build the peak: up to the peak layer, with the peak's sign, and
    at least `fraction` x the largest such write; in layer order."""
    peak = max(range(len(rows)), key=lambda i: abs(rows[i]["residual_out"]))
    sign = 1.0 if rows[peak]["residual_out"] >= 0 else -1.0
    aligned = [(r, s) for r in rows[:peak + 1] for s in SUBLAYERS if sign * r[s] > 0]
    largest = max((abs(r[s]) for r, s in aligned), default=0.0)
    return [{"layer": r["layer"], "sublayer": s, "value": r[s],
             "through_post_norm": s == "mlp" and r["post_norm"],
             "down_proj": r["down_proj"] if s == "mlp" else None}
            for r, s in aligned if abs(r[s]) >= fraction * largest]


def life(rows: list[dict], fraction: float = MASSIVE_FRACTION) -> dict:
    """Where the traced activation is born (its first writer), peaks, stays massive (at least
    `fraction` x the peak) until, and ends."""
    values = [r["residual_out"] for r in rows]
    peak = max(range(len(values)), key=lambda i: abs(values[i]))
    sign = 1.0 if values[peak] >= 0 else -1.0
    massive = [abs(v) >= fraction * abs(values[peak]) for v in values]
    last = peak
    while last + 1 < len(values) and massive[last + 1]:
        last += 1
    first = writers(rows, fraction)[0]
    ends = None
    if last + 1 < len(values):
        row = rows[last + 1]
        ends = {"layer": last + 1, "sublayer": _moved_most(row, -sign),
                "value_after": row["residual_out"]}
    return {"peak": {"layer": peak, "value": values[peak]},
            "born": {"layer": first["layer"], "sublayer": first["sublayer"],
                     "value": values[first["layer"]]},
            "persists_through": last, "ends": ends, "final_value": values[-1],
            "massive_fraction": fraction}


def _fmt(x: float) -> str:
    return f"{x:,.0f}" if abs(x) >= 100 else f"{x:.3g}"


def _layers(layers: list[int]) -> str:
    """[3, 4, 5, 8] -> "layers 3-5, 8"; [3] -> "layer 3"."""
    runs: list[list[int]] = []
    for layer in layers:
        if runs and layer == runs[-1][-1] + 1:
            runs[-1].append(layer)
        else:
            runs.append([layer])
    text = ", ".join(f"{r[0]}-{r[-1]}" if len(r) > 1 else str(r[0]) for r in runs)
    return ("layers " if len(layers) > 1 else "layer ") + text


def written_by(ws: list[dict]) -> str:
    """The writers in words, e.g. "the mlp of layers 3-8 (through the post-MLP norm)"."""
    parts = []
    for sublayer in SUBLAYERS:
        mine = [w for w in ws if w["sublayer"] == sublayer]
        if not mine:
            continue
        text = f"the {sublayer} of {_layers([w['layer'] for w in mine])}"
        if any(w["through_post_norm"] for w in mine):
            raw = max(abs(w["down_proj"]) for w in mine if w["down_proj"] is not None)
            text += (f" through the post-MLP norm (its raw down-projection output is at most "
                     f"{_fmt(raw)}, the norm's gain makes it massive)")
        parts.append(text)
    return " and ".join(parts)


def describe(activation: dict) -> str:
    """One sentence: where it is born, peaks, stays massive, ends, and who writes it."""
    a = activation
    born, peak, ends = a["born"], a["peak"], a["ends"]
    text = (f"channel {a['channel']} at token {a['token']} ({a['token_text']!r}): born in "
            f"layer {born['layer']} ({born['sublayer']}), peak {_fmt(peak['value'])} after "
            f"layer {peak['layer']}, massive (at least {a['massive_fraction']:g} x the peak) "
            f"through layer {a['persists_through']}")
    text += (f"; cancelled in layer {ends['layer']} by its {ends['sublayer']} (down to "
             f"{_fmt(ends['value_after'])})" if ends else "; still massive after the last layer")
    return text + f"; written by {written_by(a['writers'])}."


def trace_activation(stream: Stream, token: int, channel: int, origin: str,
                     super_weights: list[dict] | None = None,
                     fraction: float = MASSIVE_FRACTION) -> dict:
    rows = readings(stream, token, channel)
    activation = {"origin": origin, "channel": channel, "token": token,
                  "token_text": stream.tokens[token], "super_weights": super_weights or [],
                  **life(rows, fraction), "writers": writers(rows, fraction), "layers": rows}
    activation["statement"] = describe(activation)
    return activation


# --- what a super weight writes -----------------------------------------------------------------


def largest_residual(stream: Stream) -> dict:
    """The largest |residual_out| over every layer, token and channel."""
    best = None
    for i, out in enumerate(stream.residual_out):
        flat = int(out.abs().argmax())
        token, channel = divmod(flat, out.shape[1])
        value = float(out[token, channel])
        if best is None or abs(value) > abs(best["value"]):
            best = {"layer": i, "token": token, "channel": channel, "value": value}
    return best


def _contribution(stream: Stream, model, w: dict) -> dict:
    """Where a dense super weight writes its row most, and what it adds there."""
    layer, row, column = int(w["layer"]), int(w["row"]), int(w["column"])
    coordinate = {"layer": layer, "row": row, "column": column, "expert": w.get("expert"),
                  "shared": bool(w.get("shared", False))}
    down, down_in = stream.down_proj[layer], stream.down_proj_in[layer]
    if w.get("expert") is not None or w.get("shared") or down is None:
        token = int(stream.mlp[layer][:, row].abs().argmax())  # an expert's: the block's write
        return {**coordinate, "token": token, "down_proj_input": None, "weight": None,
                "contribution": None, "down_proj_output": None}
    token = int(down[:, row].abs().argmax())
    weight = float(arch.down_proj_matrix(model, layer)[row, column].detach())
    x = float(down_in[token, column])
    return {**coordinate, "token": token, "down_proj_input": x, "weight": weight,
            "contribution": weight * x, "down_proj_output": float(down[token, row])}


def super_activation_trace(lm, prompt: str, super_weights: list[dict],
                           fraction: float = MASSIVE_FRACTION) -> dict:
    """The trace document of notebook 06: one trace per super activation, or of the largest
    residual activation when there is no super weight."""
    input_ids = lm.tokenizer(prompt, return_tensors="pt").input_ids
    stream = residual_stream(lm.model, input_ids, lm.tokenizer)
    largest = largest_residual(stream)
    by_activation: dict[tuple[int, int], list[dict]] = {}
    for w in super_weights:
        c = _contribution(stream, lm.model, w)
        by_activation.setdefault((c["row"], c["token"]), []).append(c)
    activations = [trace_activation(stream, token, channel, "super_weight", ws, fraction)
                   for (channel, token), ws in by_activation.items()]
    if not activations:
        activations = [trace_activation(stream, largest["token"], largest["channel"],
                                        "largest_residual", [], fraction)]
        statement = ("No super weight was detected, so this traces the largest residual "
                     f"activation instead ({_fmt(largest['value'])} after layer "
                     f"{largest['layer']}): " + activations[0]["statement"])
    else:
        statement = " ".join(f"Super activation on {a['statement']}" for a in activations)
    return {"prompt": prompt, "tokens": stream.tokens, "num_layers": stream.num_layers,
            "massive_fraction": fraction, "super_weight_found": bool(super_weights),
            "largest_residual": largest, "activations": activations, "statement": statement}
