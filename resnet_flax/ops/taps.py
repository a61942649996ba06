"""Strided window slices of NHWC arrays: what each tap of a convolution or pooling window sees."""

import jax
from jax import lax


def window_tap(x: jax.Array, start: tuple[int, int], count: tuple[int, int], step: tuple[int, int]) -> jax.Array:
    """``count`` pixels of ``x`` along height and width, ``step`` apart, from pixel ``start``:
    ``x[:, i : i + sh*(ho-1) + 1 : sh, j : j + sw*(wo-1) + 1 : sw, :]`` as one ``lax.slice``.

    For a window tap (i, j) and strides (sh, sw), the input pixel that tap sees for every one of
    the (ho, wo) output positions."""
    (i, j), (ho, wo), (sh, sw) = start, count, step
    n, _, _, c = x.shape
    return lax.slice(x, (0, i, j, 0), (n, i + sh * (ho - 1) + 1, j + sw * (wo - 1) + 1, c), (1, sh, sw, 1))


def output_size(size: int, window: int, stride: int) -> int:
    """Output positions of a 'VALID' window along one axis."""
    return (size - window) // stride + 1
