"""sw_lib.quantize: round-to-nearest blockwise quantizers against brute force on small tensors."""
from __future__ import annotations

import itertools

import pytest
import torch

from sw_lib import quantize


def brute_force_block(block: list[float], bits: int) -> list[float]:
    """Every value to the nearest of the 2**bits evenly spaced levels from min to max (float64)."""
    low, high = min(block), max(block)
    if low == high:
        return list(block)
    step = (high - low) / (2 ** bits - 1)
    grid = [low + k * step for k in range(2 ** bits)]
    return [min(grid, key=lambda level: abs(level - v)) for v in block]


def brute_force(weight: torch.Tensor, bits: int, length: int) -> torch.Tensor:
    """Blocks of `length` consecutive elements per matrix (the last one shorter), by hand."""
    rows, cols = weight.shape[-2:]
    out = []
    for matrix in weight.reshape(-1, rows * cols).double().tolist():
        for start in range(0, len(matrix), length):
            out += brute_force_block(matrix[start:start + length], bits)
    return torch.tensor(out, dtype=torch.float64).reshape(weight.shape)


@pytest.mark.parametrize("bits, block_size", list(itertools.product([2, 3, 4, 8], [4, 6, 16])))
def test_blockwise_equals_brute_force(bits, block_size):
    weight = torch.randn(3, 10, generator=torch.Generator().manual_seed(bits * 100 + block_size))
    got = quantize.blockwise(weight, bits, block_size)
    expected = brute_force(weight, bits, block_size)  # 30 elements: a shorter last block for 4, 16
    assert got.dtype == weight.dtype and got.shape == weight.shape
    assert torch.allclose(got.double(), expected, atol=1e-6, rtol=0)
    flat = got.reshape(-1)
    for start in range(0, 30, block_size):  # at most 2**bits levels per block
        assert len(torch.unique(flat[start:start + block_size])) <= 2 ** bits


def test_row_and_tensor_blocks_and_stacked_matrices():
    weight = torch.randn(2, 4, 5, generator=torch.Generator().manual_seed(1))  # 2 experts
    assert torch.allclose(quantize.blockwise(weight, 3, "row").double(), brute_force(weight, 3, 5),
                          atol=1e-6)
    assert torch.allclose(quantize.blockwise(weight, 3, "tensor").double(),
                          brute_force(weight, 3, 20), atol=1e-6)
    # a block never spans two matrices: each expert keeps its own range
    assert torch.equal(quantize.blockwise(weight, 3, "tensor")[1],
                       quantize.blockwise(weight[1], 3, "tensor"))
    # min and max of each block are levels themselves; at most 2**bits values per block
    q = quantize.blockwise(weight, 2, "row")
    assert torch.allclose(q.amin(-1), weight.amin(-1), atol=1e-6)
    assert torch.allclose(q.amax(-1), weight.amax(-1), atol=1e-6)
    assert all(len(torch.unique(row)) <= 4 for row in q.reshape(-1, 5))


def test_constant_block_and_dtype_kept():
    weight = torch.full((2, 8), 0.25, dtype=torch.bfloat16)
    assert torch.equal(quantize.blockwise(weight, 4, 4), weight)
    half = torch.randn(4, 8).half()
    got = quantize.blockwise(half, 4, 8)
    assert got.dtype == torch.float16
    assert torch.allclose(got.double(), brute_force(half.float(), 4, 8), atol=1e-3)


def test_clipping_is_the_z_score_rule_per_block():
    g = torch.Generator().manual_seed(3)
    weight = torch.randn(2, 16, generator=g)
    weight[0, 5] = 40.0  # an outlier in the first block only
    got = quantize.blockwise(weight, 4, 8, clip_z=1.5)
    expected = []
    for block in weight.reshape(-1, 8).double():
        t = float(block.abs().mean() + 1.5 * block.abs().std())
        expected += brute_force_block([max(-t, min(t, v)) for v in block.tolist()], 4)
    assert torch.allclose(got.double(), torch.tensor(expected, dtype=torch.float64).reshape(2, 16), atol=1e-5)
    assert float(got[0, 5]) < 40.0 and float(got.max()) < 40.0  # clipped before quantizing


def test_per_row_activations_with_hold_out():
    g = torch.Generator().manual_seed(4)
    x = torch.randn(2, 5, 6, generator=g)  # [sequences, tokens, channels]
    x[0, 0, 3] = 500.0  # a super activation in the first sequence
    naive = quantize.per_row_int(x, 8)
    for b in range(2):  # one range per sequence, never shared across the batch
        expected = torch.tensor(brute_force_block(x[b].reshape(-1).double().tolist(), 8), dtype=torch.float64)
        assert torch.allclose(naive[b].reshape(-1).double(), expected, atol=1e-4)
    assert torch.equal(quantize.per_row_int(x[1:], 8), naive[1:])

    hold = torch.zeros_like(x, dtype=torch.bool)
    hold[0, 0, 3] = True
    held = quantize.per_row_int(x, 8, hold)
    assert float(held[0, 0, 3]) == 500.0  # passes exactly
    rest = x[0].reshape(-1).clone()
    rest[3] = rest.median()  # what the range sees in its place
    expected = torch.tensor(brute_force_block(rest.double().tolist(), 8), dtype=torch.float64)
    expected[3] = 500.0
    assert torch.allclose(held[0].reshape(-1).double(), expected, atol=1e-5)
    # without the hold-out the 500 stretches the range: the small values lose their resolution
    assert (held[0] - x[0]).abs().max() < 0.05 < (naive[0] - x[0]).abs().max()


def test_bad_arguments_are_one_line_errors():
    with pytest.raises(ValueError, match="bits must be an integer from 1 to 16"):
        quantize.blockwise(torch.ones(2, 2), 0, 2)
    with pytest.raises(ValueError, match="block_size must be an integer >= 2, 'row' or 'tensor'"):
        quantize.blockwise(torch.ones(2, 2), 4, "rows")
