"""Model FLOPs of the tokens an evaluation needs, and the matmul peak to hold them against.

The count (dense decoder models; 2 FLOPs per multiply-add):
- body: 2 x (weights of every nn.Linear inside the decoder layers) per token fed;
- attention: 4 x layers x query heads x head dim per (query, key) pair a token attends to
  (scores and the weighted sum), counting only the pairs the computation needs: causal pairs
  within a window or context, a choice's tokens against its context and its own earlier
  tokens, a generated token against everything before it;
- head: 2 x hidden x vocab per position whose log-probabilities are read (scored tokens;
  one per generated token);
- a token prefix that several questions' contexts share (MMLU's description) once, as the
  engine encodes it (eval_throughput.task_flops).
Embeddings, norms, activations and softmax are left out (a few percent). Padding, recomputed
or wasted work is not counted: the figure is the work the task needs, so GFLOP/s over wall
time says how close the engine runs to the hardware.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class Dims:
    linear_params: int  # weights of the decoder layers' linear maps
    layers: int
    heads: int
    head_dim: int
    hidden: int
    vocab: int

    @classmethod
    def of(cls, model: nn.Module) -> "Dims":
        from sw_lib import arch

        layers = arch.decoder_layers(model)
        linear = sum(m.weight.numel() for layer in layers for m in layer.modules()
                     if isinstance(m, nn.Linear))
        config = model.config
        heads = config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        head = model.get_output_embeddings().weight
        return cls(linear, len(layers), heads, head_dim, head.shape[1], head.shape[0])

    def flops(self, tokens: int, pairs: int, scored: int) -> float:
        return (2.0 * self.linear_params * tokens + 4.0 * self.layers * self.heads * self.head_dim
                * pairs + 2.0 * self.hidden * self.vocab * scored)


def causal_pairs(n: int) -> int:
    return n * (n + 1) // 2


def mc_item(context: int, continuations: list[int]) -> tuple[int, int, int]:
    """(tokens, pairs, scored) of a question: the context once, each choice as a branch."""
    tokens, pairs = context, causal_pairs(context)
    for n in continuations:
        branch = n - 1  # the last choice token is predicted, never fed
        tokens += branch
        pairs += sum(context + j + 1 for j in range(branch))
    return tokens, pairs, sum(continuations)


def window(length: int) -> tuple[int, int, int]:
    return length, causal_pairs(length), length - 1


def generation(prompt: int, generated: int) -> tuple[int, int, int]:
    """The prompt once, then each generated token but the last fed back."""
    fed = max(generated - 1, 0)
    return prompt + fed, causal_pairs(prompt) + sum(prompt + j for j in range(1, fed + 1)), generated


def matmul_peak(dtype: torch.dtype, device: str | torch.device = "cpu", size: int | None = None,
                seconds: float = 3.0) -> float:
    """GFLOP/s of a square matmul in this process (its dtype, thread count and device).

    On a GPU the products are 8192 wide (smaller ones do not fill the chip) and each timed
    stretch ends with a synchronize, so queued kernels are counted."""
    device = torch.device(device)
    size = size or (8192 if device.type == "cuda" else 2048)
    a = torch.randn(size, size).to(device=device, dtype=dtype)
    b = torch.randn(size, size).to(device=device, dtype=dtype)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    torch.matmul(a, b)
    sync()
    runs, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        torch.matmul(a, b)
        runs += 1
        if runs % 10 == 0:
            sync()
    sync()
    return 2.0 * size ** 3 * runs / (time.perf_counter() - start) / 1e9
