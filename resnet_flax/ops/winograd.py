"""The 3x3 stride-1 'same' convolution by Winograd's minimal filtering (Lavin & Gray, 2016).

F(m x m, 3 x 3) computes each m x m tile of the output from the (m+2) x (m+2) input tile around it:

    output tile = A^T [ (G g G^T) * (B^T d B) ] A        (* elementwise, summed over input channels)

with small fixed matrices B^T (input tiles), G (kernel) and A^T (output tiles). Per pair of channels
a tile takes (m+2)^2 products instead of 9 m^2: 2.25x fewer for F(2x2, 3x3), 4x fewer for
F(4x4, 3x3). Summed over input channels, the elementwise products become (m+2)^2 independent matrix
products, (tiles, C_in) @ (C_in, C_out), which XLA runs as one batched product.

Each transform on both axes of every tile, ``M @ tile @ M^T``, is one product with the Kronecker
matrix ``M (x) M`` ((m+2)^2 x (m+2)^2 at most) over the tiles' pixels, gathered first. Written-out
sums of slices instead ran within 1-2% of it either way but made about 20
more fusions per layer, and XLA took ~4.5 s longer to compile the training step
(experiments/README.md).

Accuracy (float32): F(2x2, 3x3)'s transforms are 0 / +-1 / +-1/2, and its results are as close to
the exact convolution as the direct sum's; F(4x4, 3x3)'s larger coefficients (up to 8 and 5) make
its error about ten times the direct sum's, a few 1e-6 of the output's scale
(experiments/winograd_accuracy.md; tests/test_winograd.py bounds both).

The gradient is written out rather than left to autodiff, whose transposes of the overlapping tile
slices were slow on XLA:CPU in a prototype:

* input gradient: a 'same' 3x3 convolution of ``d_out`` with the kernel flipped and its channels
  swapped, i.e. this same algorithm again (the channel swap done by the product, since
  transposing a kernel is a slow pass on XLA:CPU);
* kernel gradient: G^T [ sum over tiles (B^T d B)^T (A d_out_tile A^T) ] G, from the input tiles
  saved by the forward pass.
"""

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from resnet_flax.ops.taps import output_size, window_tap


class Transforms(NamedTuple):
    input: np.ndarray   # B^T, (m+2, m+2)
    kernel: np.ndarray  # G, (m+2, 3)
    output: np.ndarray  # A^T, (m, m+2)


TRANSFORMS = {
    2: Transforms(
        input=np.array([[1, 0, -1, 0], [0, 1, 1, 0], [0, -1, 1, 0], [0, 1, 0, -1]]),
        kernel=np.array([[1, 0, 0], [1 / 2, 1 / 2, 1 / 2], [1 / 2, -1 / 2, 1 / 2], [0, 0, 1]]),
        output=np.array([[1, 1, 1, 0], [0, 1, -1, -1]]),
    ),
    4: Transforms(
        input=np.array([[4, 0, -5, 0, 1, 0], [0, -4, -4, 1, 1, 0], [0, 4, -4, -1, 1, 0],
                        [0, -2, -1, 2, 1, 0], [0, 2, -1, -2, 1, 0], [0, 4, 0, -5, 0, 1]]),
        kernel=np.array([[1 / 4, 0, 0], [-1 / 6, -1 / 6, -1 / 6], [-1 / 6, 1 / 6, -1 / 6],
                         [1 / 24, 1 / 12, 1 / 6], [1 / 24, -1 / 12, 1 / 6], [0, 0, 1]]),
        output=np.array([[1, 1, 1, 1, 1, 0], [0, 1, -1, 2, -2, 0], [0, 1, 1, 4, 4, 0],
                         [0, 1, -1, 8, -8, 1]]),
    ),
}


def _transform_tiles(x: jax.Array, matrix: np.ndarray, step: int) -> jax.Array:
    """Every tile of the NHWC ``x`` (``matrix.shape[1]`` pixels a side, ``step`` apart) transformed
    on both axes, ``matrix @ tile @ matrix^T``: (t, t, N, tiles_h, tiles_w, C).

    The tiles' pixels are gathered as (window^2, N, tiles_h, tiles_w, C), in stacks of at most 8
    (XLA:CPU fuses a stack with the slices that feed it only up to 8), and transformed by one
    product with ``matrix (x) matrix``."""
    rows, window = matrix.shape
    tiles = (output_size(x.shape[1], window, step), output_size(x.shape[2], window, step))

    def pixel(i: int, j: int) -> jax.Array:  # pixel (i, j) of every tile
        return window_tap(x, (i, j), tiles, (step, step))

    pixels = jnp.stack([jnp.stack([pixel(i, j) for j in range(window)]) for i in range(window)])
    tiles = _times_kron(matrix, pixels.reshape(window * window, -1))
    return tiles.reshape(rows, rows, *pixels.shape[2:])


def _untile(products: jax.Array, output_matrix: np.ndarray) -> jax.Array:
    """The output tiles ``A^T m A`` of ``products`` (t, t, N, tiles_h, tiles_w, C), put side by
    side: (N, m * tiles_h, m * tiles_w, C) for m = ``output_matrix.shape[0]``."""
    m, t = output_matrix.shape
    n, tiles_h, tiles_w, c = products.shape[2:]
    tiles = _times_kron(output_matrix, products.reshape(t * t, -1)).reshape(m, m, n, tiles_h, tiles_w, c)
    return tiles.transpose(2, 3, 0, 4, 1, 5).reshape(n, tiles_h * m, tiles_w * m, c)


def _times_kron(matrix: np.ndarray, flat: jax.Array) -> jax.Array:
    """``(matrix (x) matrix) @ flat``: ``matrix @ tile @ matrix^T`` for every tile (or kernel),
    whose pixels run along ``flat``'s rows, as one product. Always at 'highest' precision: the
    transforms are part of the algorithm, whatever precision the layers use."""
    both_axes = np.kron(matrix, matrix).astype(np.float32)
    return jnp.matmul(both_axes, flat, precision=lax.Precision.HIGHEST)


def _pad_to_tiles(x: jax.Array, size: int, border: int) -> jax.Array:
    """``x`` with ``border`` zeros around it, plus zeros after to a whole number of tiles."""
    _, h, w, _ = x.shape
    extra_h, extra_w = -h % size, -w % size
    return jnp.pad(x, ((0, 0), (border, border + extra_h), (border, border + extra_w), (0, 0)))


def _kernel_transform(kernel: jax.Array, matrix: np.ndarray) -> jax.Array:
    """``matrix @ kernel @ matrix^T`` over the two spatial axes of an HWIO kernel."""
    rows, taps = matrix.shape
    return _times_kron(matrix, kernel.reshape(taps * taps, -1)).reshape(rows, rows, *kernel.shape[2:])


def _products(tiles: jax.Array, transformed_kernel: jax.Array, precision, swap_kernel_channels=False):
    """For each of the t*t tile positions, (tiles, C_in) @ (C_in, C_out), as one batched product;
    with ``swap_kernel_channels`` the kernel's (C_out, C_in) is used transposed instead."""
    t = tiles.shape[0]
    lhs = tiles.reshape(t * t, -1, tiles.shape[-1])
    rhs = transformed_kernel.reshape(t * t, *transformed_kernel.shape[2:])
    contract = 2 if swap_kernel_channels else 1
    out = lax.dot_general(lhs, rhs, (((2,), (contract,)), ((0,), (0,))), precision=precision)
    return out.reshape(*tiles.shape[:-1], out.shape[-1])


def _convolve(x: jax.Array, transformed_kernel: jax.Array, size: int, precision,
              swap_kernel_channels: bool = False) -> tuple[jax.Array, jax.Array]:
    """The convolution from transformed kernel tiles; also returns the transformed input tiles."""
    transforms = TRANSFORMS[size]
    _, h, w, _ = x.shape
    input_tiles = _transform_tiles(_pad_to_tiles(x, size, 1), transforms.input, size)
    products = _products(input_tiles, transformed_kernel, precision, swap_kernel_channels)
    return _untile(products, transforms.output)[:, :h, :w], input_tiles


def kernel_tiles(kernel: jax.Array, tile_size: int) -> jax.Array:
    """The HWIO 3x3 ``kernel`` transformed for F(``tile_size`` x ``tile_size``, 3 x 3): (t, t, C_in,
    C_out) for t = ``tile_size`` + 2, what ``conv3x3_from_tiles`` multiplies by."""
    return _kernel_transform(kernel, TRANSFORMS[tile_size].kernel)


def conv3x3_from_tiles(x: jax.Array, tiles: jax.Array, precision: str | None = None) -> jax.Array:
    """``conv3x3_same`` from a kernel already transformed by ``kernel_tiles`` (no gradient): for
    evaluation, which transforms each kernel once per call rather than once per batch."""
    return _convolve(x, tiles, tiles.shape[0] - 2, precision)[0]


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def conv3x3_same(x: jax.Array, kernel: jax.Array, tile_size: int, precision: str | None = None) -> jax.Array:
    """NHWC ``x`` convolved with the HWIO 3x3 ``kernel``, stride 1, 'same' padding, by
    F(``tile_size`` x ``tile_size``, 3 x 3); ``tile_size`` is 2 or 4."""
    return _conv3x3_same_fwd(x, kernel, tile_size, precision)[0]


def _conv3x3_same_fwd(x, kernel, tile_size, precision):
    y, input_tiles = _convolve(x, kernel_tiles(kernel, tile_size), tile_size, precision)
    return y, (input_tiles, kernel)


def _conv3x3_same_bwd(tile_size, precision, residuals, d_out):
    input_tiles, kernel = residuals
    transforms = TRANSFORMS[tile_size]
    flipped = _kernel_transform(kernel[::-1, ::-1], transforms.kernel)
    d_x = _convolve(d_out, flipped, tile_size, precision, swap_kernel_channels=True)[0]
    # A d_out_tile A^T for every output tile: tiles of tile_size pixels, not overlapping.
    d_products = _transform_tiles(_pad_to_tiles(d_out, tile_size, 0), transforms.output.T, tile_size)
    t = d_products.shape[0]
    d_kernel_tiles = lax.dot_general(
        input_tiles.reshape(t * t, -1, input_tiles.shape[-1]),
        d_products.reshape(t * t, -1, d_products.shape[-1]),
        (((1,), (1,)), ((0,), (0,))), precision=precision,
    ).reshape(t, t, input_tiles.shape[-1], d_products.shape[-1])
    d_kernel = _kernel_transform(d_kernel_tiles, transforms.kernel.T)
    # As in conv.patches_times_kernel: the kernel gradient waits for the input gradient, which
    # read the kernel, so the optimizer can update the kernel in place.
    return d_x, d_kernel + 0.0 * d_x[0, 0, 0, 0]


conv3x3_same.defvjp(_conv3x3_same_fwd, _conv3x3_same_bwd)
