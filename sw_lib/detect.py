"""Dense super weight detection: spikes, iterate-and-zero, causal confirmation.

Seed behaviour (the original script): feed one prompt, hook every layer's down projection, take
per layer the largest |input| and |output|; a layer is a candidate when both exceed
`spike_threshold`; the weight is [row = output channel, column = input channel]. Zero what was
found and run again, up to `max_iterations`, until no new coordinate appears; restore all.

Beyond the seed:
- the token of each spike is kept and `co_occurs` says whether input and output peak on the
  same token (a weight can only create the output spike where its input spikes);
- late layers spike too, without being causal: every candidate is zeroed alone and the loss
  ratio on a short WikiText-2 reference text is measured; `confirmed` above `confirm_ratio`;
- candidates are grouped by (layer, column), since zeroing one row of a column leaves the
  input spike and lets further rows surface in later iterations; each group is also confirmed;
- statistics are computed in float32 whatever the model dtype.
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field

import torch
from tqdm.auto import tqdm

from . import ablate, arch, catalog, data, prefix

DEFAULT_PROMPT = "Apple Inc. is a worldwide tech company."
DEFAULT_THRESHOLD = 50.0
DEFAULT_ITERATIONS = 10
DEFAULT_CONFIRM_RATIO = 1.02
DEFAULT_REFERENCE_TOKENS = 512


@dataclass
class LayerMaxima:
    """Largest |input| and |output| of one layer's down projection (float32)."""

    layer: int
    max_input: float
    input_token: int
    input_channel: int
    max_output: float
    output_token: int
    output_channel: int


@dataclass
class Detection:
    model: str
    fingerprint: str
    family: str
    num_layers: int
    config: dict
    candidates: list[dict]
    groups: list[dict]
    iterations: list[dict]
    reference: dict
    published: dict | None
    timing: dict
    tokens: list[str] = field(default_factory=list)

    @property
    def super_weights(self) -> list[dict]:
        return [c for c in self.candidates if c["confirmed"] or c.get("group_confirmed")]

    def to_dict(self) -> dict:
        d = asdict(self)
        d = {"schema": "sw-detection/1", **d, "super_weights": self.super_weights}
        return d


# --- one forward pass: the per-layer maxima ------------------------------------------------


def _abs_argmax(t: torch.Tensor) -> tuple[float, int, int]:
    """(max |t|, token, channel) of a [tokens, channels] tensor, in float32."""
    a = t.float().abs()
    flat = int(torch.argmax(a))
    token, channel = divmod(flat, a.shape[1])
    return float(a[token, channel]), token, channel


@torch.no_grad()
def layer_maxima(model: torch.nn.Module, input_ids: torch.Tensor) -> list[LayerMaxima]:
    """One forward pass with a hook on every dense down projection."""
    stats: dict[int, LayerMaxima] = {}

    def hook(layer):
        def record(module, args, output):
            x, y = args[0][0], output[0]  # first sequence: [tokens, channels]
            vi, ti, ci = _abs_argmax(x)
            vo, to, co = _abs_argmax(y)
            stats[layer] = LayerMaxima(layer, vi, ti, ci, vo, to, co)
        return record

    handles = [arch.down_proj(model, i).register_forward_hook(hook(i))
               for i in arch.dense_layers(model)]
    try:
        model(input_ids.to(next(model.parameters()).device))
    finally:
        for h in handles:
            h.remove()
    return [stats[i] for i in sorted(stats)]


# --- iterate and zero ---------------------------------------------------------------------


def find_candidates(model, input_ids, spike_threshold=DEFAULT_THRESHOLD,
                    max_iterations=DEFAULT_ITERATIONS, require_co_occurrence=False):
    """The seed's loop. Returns (candidates, iterations) with the model restored."""
    candidates: list[dict] = []
    iterations: list[dict] = []
    seen: set[tuple[int, int, int]] = set()
    for iteration in range(max_iterations):
        with ablate.zeroed(model, seen):
            maxima = layer_maxima(model, input_ids)
        new = []
        for m in maxima:
            if m.max_input <= spike_threshold or m.max_output <= spike_threshold:
                continue
            coord = (m.layer, m.output_channel, m.input_channel)
            co_occurs = m.input_token == m.output_token
            if coord in seen or (require_co_occurrence and not co_occurs):
                continue
            new.append(coord)
            candidates.append({
                "layer": m.layer, "row": m.output_channel, "column": m.input_channel,
                "expert": None, "shared": False, "iteration": iteration,
                "input_value": m.max_input, "output_value": m.max_output,
                "input_token": m.input_token, "output_token": m.output_token,
                "co_occurs": co_occurs,
            })
        iterations.append({"iteration": iteration, "layers": [asdict(m) for m in maxima],
                           "new": [list(c) for c in new]})
        if not new:
            break
        seen.update(new)
    return candidates, iterations


def group_by_column(candidates: list[dict]) -> list[dict]:
    """Group candidates sharing (layer, expert, column): one input spike feeding several rows."""
    groups: dict[tuple, dict] = {}
    for c in candidates:
        key = (c["layer"], c.get("expert"), c["column"])
        g = groups.setdefault(key, {"layer": c["layer"], "expert": c.get("expert"),
                                    "column": c["column"], "rows": []})
        g["rows"].append(c["row"])
    return list(groups.values())


# --- causal confirmation -------------------------------------------------------------------


def reference_ids(tokenizer, n_tokens: int = DEFAULT_REFERENCE_TOKENS) -> torch.Tensor:
    """The first `n_tokens` tokens of the bundled WikiText-2 test text, joined as the
    perplexity evaluation joins it (rows with "\n\n"), so both read the same token stream."""
    text = "\n\n".join(data.wikitext_rows())[: n_tokens * 8]  # ~4 characters a token
    ids = tokenizer(text, return_tensors="pt").input_ids[:, :n_tokens]
    return ids


@torch.no_grad()
def mean_loss(model: torch.nn.Module, input_ids: torch.Tensor) -> float:
    """Mean next-token negative log-likelihood, computed in float32."""
    input_ids = input_ids.to(next(model.parameters()).device)
    logits = model(input_ids).logits[0, :-1].float()
    return float(torch.nn.functional.cross_entropy(logits, input_ids[0, 1:]))


def confirm(model, candidates, groups, ref_ids, confirm_ratio=DEFAULT_CONFIRM_RATIO,
            progress=True) -> dict:
    """Zero each candidate (and each multi-row group) alone; record loss ratios in place.

    Layers before an edited layer are unchanged, so their recorded outputs are reused.
    """
    with prefix.recording_inputs(model, {c["layer"] for c in candidates}) as inputs:
        baseline = mean_loss(model, ref_ids)

    def ablated_loss(weights: list[dict]) -> float:
        start = min(w["layer"] for w in weights)
        with prefix.starting_at(model, start, inputs.get(start)), ablate.zeroed(model, weights):
            return mean_loss(model, ref_ids)

    for c in tqdm(candidates, desc="confirming candidates", disable=not progress, leave=False):
        c["loss"] = ablated_loss([c])
        c["loss_ratio"] = c["loss"] / baseline
        c["confirmed"] = c["loss_ratio"] >= confirm_ratio
    for g in groups:
        members = [c for c in candidates
                   if (c["layer"], c.get("expert"), c["column"]) == (g["layer"], g["expert"], g["column"])]
        loss = members[0]["loss"] if len(members) == 1 else ablated_loss(members)
        g["loss_ratio"] = loss / baseline
        g["confirmed"] = g["loss_ratio"] >= confirm_ratio
        for c in members:
            c["group_confirmed"] = g["confirmed"]
    return {"text_tokens": int(ref_ids.shape[1]), "baseline_loss": baseline}


# --- the whole detection -------------------------------------------------------------------


def detect_super_weights(lm, prompt: str = DEFAULT_PROMPT,
                         spike_threshold: float = DEFAULT_THRESHOLD,
                         max_iterations: int = DEFAULT_ITERATIONS,
                         confirm_candidates: bool = True,
                         confirm_ratio: float = DEFAULT_CONFIRM_RATIO,
                         reference_tokens: int = DEFAULT_REFERENCE_TOKENS,
                         require_co_occurrence: bool = False,
                         moe_options: dict | None = None,
                         progress: bool = True) -> Detection:
    """Find, confirm and group the super weights of a `LoadedModel`.

    Dense down projections are scanned here; for a mixture-of-experts model the expert super
    weights found by `sw_lib.moe` (with `moe_options`: p_active_floor, co_spike_threshold)
    join the same candidate list, so confirmation, grouping and the JSON treat both alike.
    """
    if spike_threshold <= 0:
        raise ValueError(f"spike_threshold must be positive, got {spike_threshold}")
    if max_iterations < 1:
        raise ValueError(f"max_iterations must be at least 1, got {max_iterations}")
    model, tokenizer = lm.model, lm.tokenizer
    input_ids = tokenizer(prompt, return_tensors="pt").input_ids
    start = time.perf_counter()
    candidates, iterations = find_candidates(model, input_ids, spike_threshold, max_iterations,
                                             require_co_occurrence)
    if lm.family.moe is not None:
        from . import moe

        candidates += moe.detect_expert_super_weights(
            lm, prompt, spike_threshold, max_iterations, **(moe_options or {}))
    detection_seconds = time.perf_counter() - start
    tokens = [tokenizer.decode([t]) for t in input_ids[0].tolist()]
    for c in candidates:
        c["token_text"] = tokens[c["output_token"]]
    groups = group_by_column(candidates)

    start = time.perf_counter()
    reference: dict = {}
    if confirm_candidates and candidates:
        reference = confirm(model, candidates, groups, reference_ids(tokenizer, reference_tokens),
                            confirm_ratio, progress)
    else:
        for c in candidates:
            c.update(loss_ratio=None, confirmed=True)
        for g in groups:
            g.update(loss_ratio=None, confirmed=True)
    confirmation_seconds = time.perf_counter() - start

    return Detection(
        model=lm.name, fingerprint=lm.fingerprint, family=lm.family.name,
        num_layers=arch.num_layers(model),
        config={"prompt": prompt, "spike_threshold": spike_threshold,
                "max_iterations": max_iterations, "confirm": confirm_candidates,
                "confirm_ratio": confirm_ratio, "reference_tokens": reference_tokens,
                "require_co_occurrence": require_co_occurrence, "moe_options": moe_options,
                "dtype": str(lm.dtype).removeprefix("torch."), "device": str(lm.device)},
        candidates=candidates, groups=groups, iterations=iterations, reference=reference,
        published=catalog.compare(lm.name, candidates),
        timing={"detection_seconds": detection_seconds,
                "confirmation_seconds": confirmation_seconds},
        tokens=tokens,
    )
