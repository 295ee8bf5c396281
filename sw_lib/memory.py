"""How much memory a model needs, known before its weights are loaded, and whether it fits.

The weights: the parameter count from the safetensors headers of a folder (exact), the tensor
table of a GGUF file (exact; dequantized to the load dtype), else from the config's sizes
(embedding, attention, MLP or experts per layer, untied head), times the load dtype's bytes.
The evaluation's activations: one forward pass of `token_budget` tokens keeps the float32
logits (tokens x vocabulary) and a few hidden- and MLP-wide tensors per token. A model that
will not fit fails at once with the numbers (`MemoryError`, one line), not minutes into loading.

The evaluation's token budget (padded tokens per forward pass) may be "auto": once per loaded
model, after loading, `resolve_token_budget` sizes it to the memory then free, capped per
device type (`AUTO_CAPS`).
"""
from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from pathlib import Path

GIB = 1024 ** 3
AUTO = "auto"
# The most tokens per forward pass "auto" gives, by device type. CPU: 1024, the measured best
# there (evaluate/batching.py: larger batches were not faster and cost memory). CUDA and MPS:
# the free memory decides; the cap only bounds one pass (32768 tokens of float32 logits over a
# 150k vocabulary are ~19 GiB), far past the batch at which a GPU's matmuls are saturated, so
# a larger pass would gain no speed and only hold more memory. Other types get the CPU's cap.
AUTO_CAPS = {"cpu": 1024, "cuda": 32768, "mps": 32768}
AUTO_FLOOR = 64  # "auto" never gives fewer tokens; the check before loading counts these
DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}


class NotEnoughMemory(MemoryError):
    """The model's estimate exceeds the memory available; the message is one line."""


@dataclass(frozen=True)
class Estimate:
    parameters: int
    dtype: str
    weights_bytes: int
    activations_bytes: int
    token_budget: int
    source: str  # safetensors headers | gguf tensor table | config

    @property
    def total_bytes(self) -> int:
        return self.weights_bytes + self.activations_bytes


def safetensors_parameters(folder: Path) -> int | None:
    """Elements of every tensor in the folder's .safetensors files, read from their headers
    (8 bytes of length, then JSON); None when the folder has none."""
    files = sorted(Path(folder).glob("*.safetensors"))
    if not files:
        return None
    total = 0
    for path in files:
        with open(path, "rb") as f:
            (length,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(length))
        total += sum(math.prod(t["shape"]) for name, t in header.items() if name != "__metadata__")
    return total


def gguf_parameters(path: Path) -> int:
    from . import gguf_header

    return sum(math.prod(t.shape) for t in gguf_header.read_header(path).tensors)


def config_parameters(config) -> int:
    """Parameters from a transformers config's sizes (dense or MoE decoder)."""
    text = getattr(config, "text_config", None) or config
    h, layers, vocab = text.hidden_size, text.num_hidden_layers, text.vocab_size
    heads = text.num_attention_heads
    head_dim = getattr(text, "head_dim", None) or h // heads
    kv_heads = getattr(text, "num_key_value_heads", None) or heads
    attention = h * head_dim * (2 * heads + 2 * kv_heads)  # q, o and k, v
    if text.model_type.startswith("qwen2"):  # q, k, v biases, always
        attention += head_dim * (heads + 2 * kv_heads)
    elif getattr(text, "attention_bias", False):  # q, k, v and o biases
        attention += head_dim * (heads + 2 * kv_heads) + h
    experts = (getattr(text, "num_local_experts", None) or getattr(text, "num_experts", None)
               or getattr(text, "n_routed_experts", None))
    if experts:
        width = getattr(text, "moe_intermediate_size", None) or text.intermediate_size
        shared = getattr(text, "shared_expert_intermediate_size", None) or 0
        mlp = 3 * h * width * experts + 3 * h * shared + h * experts  # experts, shared, router
    else:
        mlp = 3 * h * text.intermediate_size
    head = 0 if getattr(text, "tie_word_embeddings", False) else vocab * h
    return vocab * h + layers * (attention + mlp + 2 * h) + h + head


def activations_bytes(config, token_budget: int, dtype: str) -> int:
    """One forward pass of `token_budget` tokens: float32 logits over the vocabulary plus, per
    token, a few hidden-wide and MLP-wide tensors of the load dtype (what is alive at once)."""
    text = getattr(config, "text_config", None) or config
    width = (getattr(text, "moe_intermediate_size", None) or
             getattr(text, "intermediate_size", None) or 4 * text.hidden_size)
    per_token = 4 * text.vocab_size + DTYPE_BYTES[dtype] * (4 * text.hidden_size + 3 * width)
    return token_budget * per_token


def estimate(config, dtype: str, token_budget: int, where: Path | None = None) -> Estimate:
    """The memory `config`'s model needs in `dtype` (float32, float16, bfloat16), counting its
    parameters from `where` (a folder's safetensors headers or a .gguf file) when given."""
    count, source = None, "config"
    if where is not None and Path(where).is_file() and str(where).endswith(".gguf"):
        count, source = gguf_parameters(Path(where)), "gguf tensor table"
    elif where is not None and Path(where).is_dir():
        count = safetensors_parameters(Path(where))
        source = "safetensors headers" if count is not None else source
    if count is None:
        count = config_parameters(config)
    return Estimate(count, dtype, count * DTYPE_BYTES[dtype],
                    activations_bytes(config, token_budget, dtype), token_budget, source)


def check_fits(name: str, needed: Estimate, available_bytes: int, device: str) -> None:
    """Raise NotEnoughMemory (one line, with the numbers) when `needed` exceeds what is free."""
    if needed.total_bytes <= available_bytes:
        return
    raise NotEnoughMemory(
        f"model '{name}' needs about {needed.total_bytes / GIB:.2f} GiB "
        f"({needed.parameters / 1e9:.2f} B parameters in {needed.dtype} = "
        f"{needed.weights_bytes / GIB:.2f} GiB, from the {needed.source}, + "
        f"{needed.activations_bytes / GIB:.2f} GiB of activations for "
        f"{needed.token_budget} tokens) but {device} has {available_bytes / GIB:.2f} GiB "
        "free; use a device_map that offloads layers, a smaller dtype or evaluation.token_budget, "
        "or a larger device")


def available_bytes(device) -> int:
    """Free memory of a torch device now: CUDA from the driver, else the system's RAM."""
    import torch

    if getattr(device, "type", str(device)).startswith("cuda"):
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    import psutil

    return int(psutil.virtual_memory().available)


def token_budget_for(free_bytes: int, config, dtype: str, share: float = 0.5,
                     floor: int = 64) -> int:
    """The tokens one forward pass may hold when `share` of `free_bytes` (what is left after
    the weights) goes to activations; at least `floor`."""
    per_token = activations_bytes(config, 1, dtype)
    return max(floor, int(free_bytes * share // per_token))


def auto_token_budget(free_bytes: int, config, dtype: str, device_type: str) -> int:
    """What "auto" gives: half of `free_bytes` spent on activations, within the device type's
    cap (AUTO_CAPS) and at least AUTO_FLOOR."""
    cap = AUTO_CAPS.get(device_type, AUTO_CAPS["cpu"])
    return min(cap, token_budget_for(free_bytes, config, dtype, floor=AUTO_FLOOR))


def check_token_budget(setting) -> int | str:
    """A token budget setting, normalised by the params rule: a positive integer or "auto";
    anything else raises ValueError in one line naming evaluation.token_budget."""
    from . import config

    try:
        return config.RULES["evaluation.token_budget"](setting)
    except ValueError as err:
        raise ValueError(f"evaluation.token_budget: must be {err}, got {setting!r}") from None


def resolve_token_budget(lm, setting) -> int:
    """The padded tokens per forward pass an evaluation of `lm` (a LoadedModel) uses.

    An integer setting is used as it is. "auto" is resolved once per loaded model, at the first
    call (after loading, before any evaluation holds memory), to `auto_token_budget` of the
    memory then free on the model's device (for a device_map model: where its first weights
    are), and kept on `lm.auto_token_budget` so every later call of the run agrees.
    """
    setting = check_token_budget(setting)
    if setting != AUTO:
        return setting
    if getattr(lm, "auto_token_budget", None) is None:
        device = next(lm.model.parameters()).device
        dtype = str(next(lm.model.parameters()).dtype).removeprefix("torch.")
        lm.auto_token_budget = auto_token_budget(available_bytes(device), lm.model.config,
                                                 dtype, device.type)
    return lm.auto_token_budget
