"""Winograd's F(2x2, 3x3) and F(4x4, 3x3) against float64 references, and the tile choice: on
the maps ResNet-50 has (15x15 and 8x8 take F(4x4), 4x4 F(2x2)), odd sizes that leave a partial
tile, and unequal channel counts."""

import numpy as np
import pytest

from reference import reference_sin_loss_grads, sin_loss_and_grads
from resnet_flax.ops import conv, winograd

WINOGRAD_CASES = [(15, 4), (8, 4), (7, 2), (4, 2), (5, 4), (6, 2)]


@pytest.mark.parametrize("side, tile_size", WINOGRAD_CASES)
def test_winograd_matches_the_reference_within_its_error_bound(side, tile_size):
    rng = np.random.default_rng(side)
    x = rng.standard_normal((2, side, side, 16)).astype(np.float32)
    kernel = rng.standard_normal((3, 3, 16, 24)).astype(np.float32) / 12
    y, d_x, d_kernel = reference_sin_loss_grads(x.astype(np.float64), kernel.astype(np.float64))

    out = winograd.conv3x3_same(x, kernel, tile_size, "highest")
    direct = conv.conv2d(x, kernel, padding="SAME", impl="xla")
    _, (wx, wk) = sin_loss_and_grads(lambda x, k: winograd.conv3x3_same(x, k, tile_size, "highest"))(x, kernel)
    # Errors relative to each result's scale. The direct sum's error here is ~1e-7; F(2x2, 3x3)
    # stays within a few times that, F(4x4, 3x3) about ten times it (its coefficients reach 8).
    bound = 1e-6 if tile_size == 2 else 1e-5
    for name, got, want in [("output", out, y), ("input gradient", wx, d_x), ("kernel gradient", wk, d_kernel)]:
        error = np.abs(np.asarray(got, np.float64) - want).max() / np.abs(want).max()
        assert error < bound, f"{name}: relative error {error:.1e}"
    assert np.abs(np.asarray(direct, np.float64) - y).max() / np.abs(y).max() < 1e-6


def test_winograd_implementation_picks_its_tiles_and_keeps_im2col_elsewhere():
    same3 = ((1, 1), (1, 1))
    assert conv.winograd_tile_size((3, 3, 8, 8), (1, 1), same3, (15, 15)) == 4
    assert conv.winograd_tile_size((3, 3, 8, 8), (1, 1), same3, (8, 8)) == 4
    assert conv.winograd_tile_size((3, 3, 8, 8), (1, 1), same3, (4, 7)) == 2
    assert conv.winograd_tile_size((3, 3, 8, 8), (1, 1), same3, (2, 2)) is None
    assert conv.winograd_tile_size((3, 3, 8, 8), (2, 2), same3, (15, 15)) is None
    assert conv.winograd_tile_size((3, 3, 8, 8), (1, 1), ((0, 0), (0, 0)), (15, 15)) is None
    assert conv.winograd_tile_size((1, 1, 8, 8), (1, 1), ((0, 0), (0, 0)), (15, 15)) is None

    rng = np.random.default_rng(3)
    kernel = rng.standard_normal((3, 3, 4, 4)).astype(np.float32)
    for side, tile_size in [(8, 4), (4, 2)]:
        x = rng.standard_normal((1, side, side, 4)).astype(np.float32)
        np.testing.assert_array_equal(conv.conv2d(x, kernel, padding="SAME", impl="winograd"),
                                      winograd.conv3x3_same(x, kernel, tile_size, "highest"))
    x = rng.standard_normal((1, 2, 2, 4)).astype(np.float32)
    np.testing.assert_array_equal(conv.conv2d(x, kernel, padding="SAME", impl="winograd"),
                                  conv.conv2d(x, kernel, padding="SAME", impl="gemm"))
