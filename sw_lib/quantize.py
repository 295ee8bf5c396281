"""Simulated round-to-nearest quantization: quantize, dequantize, and hand back the model's dtype.

The quantizer of the paper's experiments (Yu et al. 2024, section 5), written once:

- `rtn(values, bits)`: asymmetric min-max round-to-nearest of each row of a [n, size] tensor.
  A row's 2**bits levels are min + k * step, step = (max - min) / (2**bits - 1); every value
  goes to its nearest level (halves to even, as torch.round does). A constant row has no
  step and stays as it is. Computed in float32 whatever the input dtype.
- `blockwise(weight, bits, block_size, clip_z)`: a weight quantized in blocks of
  `block_size` consecutive elements along its last (contiguous) dimension, one block after
  another over each matrix, as the paper's code does (`reshape(-1, block_size)`); a matrix
  whose size is not a multiple of the block ends in one shorter block. `block_size` may
  also be "row" (the last dimension's length: one block per row) or "tensor" (one block per
  matrix). `clip_z`: the super-weight-aware variant first clips each block to
  +-(mean |w| + clip_z * std |w|) of that block (the paper's z-score clipping), so outliers
  no longer stretch the levels; the caller puts the super weights back in full precision.
- `per_row_int(values, bits, hold_out)`: activations, one quantization range per row (per
  sequence: a [batch, tokens, channels] tensor has one range per batch row, so results do not
  depend on which sequences share a batch); `hold_out` marks elements that are kept out of
  the range (replaced by the row's median while the range is taken) and keep their exact
  values afterwards, the paper's "hold out the super activation".
"""
from __future__ import annotations

import torch

BLOCK_WORDS = ("row", "tensor")


def levels(bits: int) -> int:
    """Number of steps between the lowest and the highest level: 2**bits - 1."""
    if not isinstance(bits, int) or isinstance(bits, bool) or not 1 <= bits <= 16:
        raise ValueError(f"bits must be an integer from 1 to 16, got {bits!r}")
    return 2 ** bits - 1


def rtn(values: torch.Tensor, bits: int) -> torch.Tensor:
    """Asymmetric round-to-nearest of every row of a 2-D tensor, dequantized (float32)."""
    x = values.float()
    low = x.amin(dim=1, keepdim=True)
    high = x.amax(dim=1, keepdim=True)
    step = (high - low) / levels(bits)
    constant = step == 0  # one level holds the whole row exactly
    step = torch.where(constant, torch.ones_like(step), step)
    quantized = torch.round((x - low) / step) * step + low
    return torch.where(constant, x, quantized)


def block_length(block_size: int | str, shape: torch.Size) -> int:
    """Elements per block of a weight of `shape` (its last two dimensions form a matrix)."""
    if block_size == "row":
        return shape[-1]
    if block_size == "tensor":
        return shape[-1] * (shape[-2] if len(shape) > 1 else 1)
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 2:
        raise ValueError(f"block_size must be an integer >= 2, 'row' or 'tensor', "
                         f"got {block_size!r}")
    return block_size


def clip_outliers(blocks: torch.Tensor, z: float) -> torch.Tensor:
    """Each row clipped to +-(mean |w| + z * std |w|) of that row (float32)."""
    magnitude = blocks.abs()
    threshold = magnitude.mean(dim=1, keepdim=True) + z * magnitude.std(dim=1, keepdim=True)
    return torch.maximum(torch.minimum(blocks, threshold), -threshold)


def _quantize_blocks(blocks: torch.Tensor, bits: int, clip_z: float | None) -> torch.Tensor:
    if clip_z is not None and blocks.shape[1] > 1:
        blocks = clip_outliers(blocks, clip_z)
    return rtn(blocks, bits)


def blockwise(weight: torch.Tensor, bits: int, block_size: int | str = "row",
              clip_z: float | None = None) -> torch.Tensor:
    """`weight` quantized in blocks along its last dimension, dequantized, in its own dtype."""
    length = block_length(block_size, weight.shape)
    per_matrix = weight.shape[-1] * (weight.shape[-2] if weight.dim() > 1 else 1)
    matrices = weight.detach().float().reshape(-1, per_matrix)
    whole = per_matrix // length * length
    out = torch.empty_like(matrices)
    if whole:
        out[:, :whole] = _quantize_blocks(matrices[:, :whole].reshape(-1, length), bits,
                                          clip_z).reshape(matrices.shape[0], whole)
    if whole < per_matrix:  # the shorter last block of each matrix
        out[:, whole:] = _quantize_blocks(matrices[:, whole:], bits, clip_z)
    return out.reshape(weight.shape).to(weight.dtype)


def per_row_int(values: torch.Tensor, bits: int,
                hold_out: torch.Tensor | None = None) -> torch.Tensor:
    """Activations [rows, ...] quantized with one range per row; `hold_out` (same shape, bool)
    marks elements kept out of the range and restored exactly. Returns the input dtype."""
    flat = values.detach().float().reshape(values.shape[0], -1)
    if hold_out is None:
        return rtn(flat, bits).reshape(values.shape).to(values.dtype)
    mask = hold_out.reshape(flat.shape)
    median = flat.median(dim=1, keepdim=True).values
    quantized = rtn(torch.where(mask, median, flat), bits)
    return torch.where(mask, flat, quantized).reshape(values.shape).to(values.dtype)
