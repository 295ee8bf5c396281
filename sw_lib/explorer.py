"""The interactive explorer behind notebooks/00_explorer.ipynb: what the widgets compute.

- `layer_spikes`: per layer the down projection's largest |input| and |output| on a prompt,
  and which layers spike (both above the threshold: a super weight's signature);
- `channel_token_magnitudes`: one layer's |input| or |output| of the down projection as a
  channel-by-token matrix (the channels with the largest values);
- `ScaledWeight`: one down-projection weight multiplied in place by a scale, restored to its
  original bits when the scale returns to 1 or on `restore()`;
- `Explorer`: a model, a prompt and a short text; `set_weight` / `set_scale` return the
  next-token distribution and the loss on the text at the current scale;
- `build_ui`: the ipywidgets around an Explorer (layer, weight, scale slider) whose callbacks
  are the methods above, so tests drive the widgets from Python.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from . import arch, detect, hooks
from .ablate import weight_label

DEFAULT_TEXT = ("The tower is 324 metres tall, about the same height as an 81-storey building, "
                "and the tallest structure in Paris.")
TOP_TOKENS = 10
TOP_CHANNELS = 24
SCALE_RANGE = (0.0, 3.0)


# --- what one forward pass shows ---------------------------------------------------------------


def layer_spikes(lm, prompt: str, threshold: float = detect.DEFAULT_THRESHOLD) -> list[dict]:
    """Per layer: max |input| and |output| of the down projection (float32), their token and
    channel, and `spike` when both exceed `threshold` (a candidate layer of the detector)."""
    ids = encode(lm, prompt)
    rows = []
    for m in detect.layer_maxima(lm.model, ids):
        rows.append({"layer": m.layer, "max_input": m.max_input, "input_channel": m.input_channel,
                     "input_token": m.input_token, "max_output": m.max_output,
                     "output_channel": m.output_channel, "output_token": m.output_token,
                     "spike": m.max_input > threshold and m.max_output > threshold})
    return rows


@torch.no_grad()
def channel_token_magnitudes(lm, prompt: str, layer: int, side: str = "input",
                             top: int = TOP_CHANNELS) -> dict:
    """|input| (MLP channels, a weight's column) or |output| (residual channels, its row) of
    layer `layer`'s down projection, for the `top` channels with the largest value on any
    token: {"channels": [c], "tokens": [text], "values": [[|v| per token] per channel]}."""
    if side not in ("input", "output"):
        raise ValueError(f"side must be 'input' or 'output', not {side!r}")
    ids = encode(lm, prompt)
    seen = {}

    def record(module, args, output):
        seen["x"] = (args[0] if side == "input" else output)[0].float().abs().cpu()

    with hooks.attached([(arch.down_proj(lm.model, layer), record)]):
        lm.model(ids.to(next(lm.model.parameters()).device))
    values = seen["x"].T  # [channels, tokens]
    top = min(top, values.shape[0])
    channels = torch.topk(values.max(dim=1).values, top).indices.sort().values
    return {"layer": layer, "side": side, "channels": channels.tolist(),
            "tokens": token_texts(lm, ids), "values": values[channels].tolist()}


def encode(lm, text: str) -> torch.Tensor:
    if not text:
        raise ValueError("the prompt is empty: type a few words")
    return lm.tokenizer(text, return_tensors="pt").input_ids


def token_texts(lm, ids: torch.Tensor) -> list[str]:
    return [lm.tokenizer.decode([t]) for t in ids[0].tolist()]


@torch.no_grad()
def next_token_distribution(lm, prompt: str, k: int = TOP_TOKENS) -> list[tuple[str, float]]:
    """The `k` most likely next tokens after `prompt` with their probabilities (float32)."""
    ids = encode(lm, prompt).to(next(lm.model.parameters()).device)
    probs = torch.softmax(lm.model(ids).logits[0, -1].float(), dim=-1)
    top = torch.topk(probs, k)
    return [(lm.tokenizer.decode([int(i)]), float(p)) for p, i in zip(top.values, top.indices)]


@torch.no_grad()
def text_loss(lm, text: str) -> float:
    """Mean next-token negative log-likelihood of `text`, in float32."""
    ids = encode(lm, text).to(next(lm.model.parameters()).device)
    logits = lm.model(ids).logits[0, :-1].float()
    return float(torch.nn.functional.cross_entropy(logits, ids[0, 1:]))


# --- one weight, scaled in place -----------------------------------------------------------------


class ScaledWeight:
    """Down-projection weight [row, column] of `layer` multiplied by a scale, in place.

    The original value is kept; scale 1 (and `restore`) writes it back, so the model's bits are
    exactly what they were.
    """

    def __init__(self, model: torch.nn.Module, layer: int, row: int, column: int):
        self.matrix = arch.weight_matrix(model, layer)
        if not (0 <= row < self.matrix.shape[0] and 0 <= column < self.matrix.shape[1]):
            raise IndexError(f"weight [{row}, {column}] is outside layer {layer}'s "
                             f"[{self.matrix.shape[0]}, {self.matrix.shape[1]}] down projection")
        self.layer, self.row, self.column = layer, row, column
        self.original = self.matrix[row, column].clone()
        self.scale = 1.0

    @property
    def label(self) -> str:
        return weight_label({"layer": self.layer, "row": self.row, "column": self.column})

    @torch.no_grad()
    def set(self, scale: float) -> None:
        if scale == 1.0:
            self.restore()
            return
        self.matrix[self.row, self.column] = self.original * scale
        self.scale = float(scale)

    @torch.no_grad()
    def restore(self) -> None:
        self.matrix[self.row, self.column] = self.original
        self.scale = 1.0


# --- the explorer ------------------------------------------------------------------------------


@dataclass
class Reading:
    """What the model does at the current scale, with the unchanged model's for comparison."""

    weight: str | None
    scale: float
    next_tokens: list[tuple[str, float]]
    loss: float
    baseline_next_tokens: list[tuple[str, float]]
    baseline_loss: float


class Explorer:
    """A model, a prompt and a short text; one weight at a time scaled in place."""

    def __init__(self, lm, prompt: str = detect.DEFAULT_PROMPT, text: str = DEFAULT_TEXT,
                 threshold: float = detect.DEFAULT_THRESHOLD):
        self.lm, self.prompt, self.text, self.threshold = lm, prompt, text, threshold
        self.weight: ScaledWeight | None = None
        self.spikes = layer_spikes(lm, prompt, threshold)
        self._baseline = (next_token_distribution(lm, prompt), text_loss(lm, text))

    def candidates(self) -> list[dict]:
        """The weight each spiking layer points at: [output channel, input channel]."""
        return [{"layer": s["layer"], "row": s["output_channel"], "column": s["input_channel"]}
                for s in self.spikes if s["spike"]]

    def set_prompt(self, prompt: str) -> None:
        """A new prompt: the weight is restored first, then spikes and baseline are redone."""
        self.restore()
        self.weight = None
        self.prompt = prompt
        self.spikes = layer_spikes(self.lm, prompt, self.threshold)
        self._baseline = (next_token_distribution(self.lm, prompt), text_loss(self.lm, self.text))

    def set_model(self, lm) -> None:
        """Another model: the current one's weight is restored before it is let go."""
        self.restore()
        self.weight = None
        self.lm = lm
        self.set_prompt(self.prompt)

    def set_weight(self, layer: int, row: int, column: int) -> Reading:
        """Pick the weight the slider scales; the one picked before is restored first."""
        self.restore()
        self.weight = ScaledWeight(self.lm.model, layer, row, column)
        return self.reading()

    def set_scale(self, scale: float) -> Reading:
        if self.weight is None:
            raise ValueError("pick a weight first (set_weight)")
        low, high = SCALE_RANGE
        if not low <= scale <= high:
            raise ValueError(f"scale must be between {low:g} and {high:g}, got {scale:g}")
        self.weight.set(scale)
        return self.reading()

    def reading(self) -> Reading:
        base_tokens, base_loss = self._baseline
        if self.weight is None or self.weight.scale == 1.0:
            return Reading(self.weight.label if self.weight else None, 1.0, base_tokens,
                           base_loss, base_tokens, base_loss)
        return Reading(self.weight.label, self.weight.scale,
                       next_token_distribution(self.lm, self.prompt),
                       text_loss(self.lm, self.text), base_tokens, base_loss)

    def restore(self) -> None:
        """Put the scaled weight's original bits back (moving on, or at the end)."""
        if self.weight is not None:
            self.weight.restore()


# --- figures -----------------------------------------------------------------------------------


def spikes_figure(spikes: list[dict], threshold: float, title: str = ""):
    """Bars per layer of max |input| and |output| (log scale); spiking layers in red."""
    import matplotlib.pyplot as plt

    layers = [s["layer"] for s in spikes]
    fig, axes = plt.subplots(1, 2, figsize=(12, 3.4), sharex=True)
    for ax, key, name in zip(axes, ("max_input", "max_output"),
                             ("max |input| (column)", "max |output| (row)")):
        colors = ["crimson" if s["spike"] else "steelblue" for s in spikes]
        ax.bar(layers, [max(s[key], 1e-6) for s in spikes], color=colors)
        ax.axhline(threshold, color="red", linestyle="--", linewidth=1)
        ax.set(yscale="log", xlabel="layer", title=f"down projection {name}")
        for s in spikes:
            if s["spike"]:
                channel = s["input_channel" if key == "max_input" else "output_channel"]
                ax.annotate(str(channel), (s["layer"], s[key]), ha="center", va="bottom",
                            fontsize=7, xytext=(0, 2), textcoords="offset points")
    fig.suptitle(title or "per layer (red: both spike above the threshold; labels: channel)")
    fig.tight_layout()
    return fig


def magnitudes_figure(m: dict):
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(min(14, 2 + 0.6 * len(m["tokens"])), 0.25 * len(m["channels"]) + 1.5))
    image = ax.imshow(m["values"], aspect="auto", cmap="magma", norm="log" if any(
        v > 0 for row in m["values"] for v in row) else None)
    ax.set_xticks(range(len(m["tokens"])), [repr(t) for t in m["tokens"]], rotation=45, ha="right",
                  fontsize=7)
    ax.set_yticks(range(len(m["channels"])), m["channels"], fontsize=7)
    ax.set_ylabel("MLP channel (column)" if m["side"] == "input" else "residual channel (row)")
    ax.set_title(f"layer {m['layer']}: |{m['side']}| of the down projection, by token")
    fig.colorbar(image, ax=ax)
    fig.tight_layout()
    return fig


def reading_figure(r: Reading):
    """Next-token probabilities at this scale next to the unchanged model's."""
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 3.2))
    for ax, tokens, name in ((axes[0], r.baseline_next_tokens, "unchanged"),
                             (axes[1], r.next_tokens, f"{r.weight or 'no weight'} × {r.scale:g}")):
        ax.barh([repr(t) for t, _ in tokens][::-1], [p for _, p in tokens][::-1], color="steelblue")
        ax.set_xlim(0, 1)
        ax.set_title(f"next token, {name}", fontsize=9)
    fig.suptitle(f"loss on the text: {r.baseline_loss:.3f} unchanged, {r.loss:.3f} at this scale")
    fig.tight_layout()
    return fig


# --- widgets -----------------------------------------------------------------------------------


def _show(ui: dict, name: str, fig) -> None:
    """Draw `fig` in the output widget `name`; keep it in ui["figures"] (what is shown now)."""
    import matplotlib.pyplot as plt
    from IPython.display import display

    ui.setdefault("figures", {})[name] = fig
    output = ui[name]
    output.clear_output(wait=True)
    with output:
        display(fig)
    plt.close(fig)


def build_ui(explorer: Explorer, models: list[str] | None = None, load=None):
    """The explorer's widgets: model, prompt, spikes per layer, a layer's channel-by-token
    view, a weight and its scale slider with the next-token distribution and loss. `models`
    lists the choices of the model picker and `load(spec)` loads one (default
    sw_lib.models.load_model). Returns a dict of the widgets (`ui["box"]` is displayed)."""
    import ipywidgets as w

    choices = list(dict.fromkeys([explorer.lm.name, *(models or [])]))
    ui = {"model": w.Dropdown(options=choices, value=explorer.lm.name, description="model"),
          "prompt": w.Text(value=explorer.prompt, description="prompt", continuous_update=False,
                           layout=w.Layout(width="60%")),
          "spikes": w.Output(), "channels": w.Output(), "reading": w.Output(),
          "layer": w.Dropdown(description="layer"),
          "side": w.ToggleButtons(options=["input", "output"], description="values"),
          "weight": w.Dropdown(description="weight"),
          "scale": w.FloatSlider(value=1.0, min=SCALE_RANGE[0], max=SCALE_RANGE[1], step=0.05,
                                 description="scale", continuous_update=False),
          "status": w.HTML()}

    def weight_options():
        picks = [(weight_label(c) + " (spike)", (c["layer"], c["row"], c["column"]))
                 for c in explorer.candidates()]
        layer = ui["layer"].value
        row = next(s for s in explorer.spikes if s["layer"] == layer)
        here = (layer, row["output_channel"], row["input_channel"])
        if all(p[1] != here for p in picks):
            picks.append((weight_label(dict(zip(("layer", "row", "column"), here))), here))
        return picks

    def show_spikes():
        _show(ui, "spikes", spikes_figure(explorer.spikes, explorer.threshold,
                                          f"{explorer.lm.name}: {explorer.prompt!r}"))

    def show_channels(*_):
        _show(ui, "channels", magnitudes_figure(channel_token_magnitudes(
            explorer.lm, explorer.prompt, ui["layer"].value, ui["side"].value)))

    def show_reading(reading: Reading):
        _show(ui, "reading", reading_figure(reading))
        ui["status"].value = (f"<b>{reading.weight or 'no weight'}</b> × {reading.scale:g}: loss "
                              f"{reading.baseline_loss:.3f} → {reading.loss:.3f}")

    def on_weight(change):
        current = explorer.weight
        if change["new"] is None or (current is not None and change["new"] == (
                current.layer, current.row, current.column)):
            return
        ui["scale"].value = 1.0  # a new weight starts unscaled (the old one is restored)
        show_reading(explorer.set_weight(*change["new"]))

    def on_scale(change):
        if explorer.weight is not None:
            show_reading(explorer.set_scale(change["new"]))

    def on_layer(change):
        show_channels()
        set_weight_options()

    def set_weight_options():
        """The spike candidates and this layer's own weight; the picked one stays picked."""
        keep, options = ui["weight"].value, weight_options()
        ui["weight"].options = options
        ui["weight"].value = keep if keep in [v for _, v in options] else options[0][1]

    def refresh():
        """After a new prompt or model: spikes, layers, weights and the reading again."""
        ui["scale"].value = 1.0
        show_spikes()
        with ui["layer"].hold_trait_notifications():
            ui["layer"].options = layer_options()
            ui["layer"].value = first_layer()
        on_layer(None)
        if ui["weight"].value is not None:
            show_reading(explorer.set_weight(*ui["weight"].value))

    def on_prompt(change):
        explorer.set_prompt(change["new"])
        refresh()

    def on_model(change):
        from . import models as model_loading

        ui["status"].value = f"loading {change['new']} ..."
        explorer.set_model((load or model_loading.load_model)(change["new"]))
        refresh()

    def layer_options():
        return [(f"layer {s['layer']}" + (" (spike)" if s["spike"] else ""), s["layer"])
                for s in explorer.spikes]

    def first_layer():
        spiking = [s["layer"] for s in explorer.spikes if s["spike"]]
        return spiking[0] if spiking else explorer.spikes[0]["layer"]

    ui["layer"].options = layer_options()
    ui["layer"].value = first_layer()
    set_weight_options()
    show_spikes()
    show_channels()
    ui["weight"].observe(on_weight, names="value")
    ui["scale"].observe(on_scale, names="value")
    ui["layer"].observe(on_layer, names="value")
    ui["side"].observe(show_channels, names="value")
    ui["prompt"].observe(on_prompt, names="value")
    ui["model"].observe(on_model, names="value")
    show_reading(explorer.set_weight(*ui["weight"].value))
    ui["box"] = w.VBox([w.HBox([ui["model"], ui["prompt"]]), ui["spikes"], w.HBox([ui["layer"], ui["side"]]),
                        ui["channels"], w.HBox([ui["weight"], ui["scale"]]), ui["status"],
                        ui["reading"]])
    return ui
