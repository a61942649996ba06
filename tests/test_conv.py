"""The convolution implementations against a direct NumPy convolution with TensorFlow padding,
and evaluation's derived kernels (per-tap products, Winograd's transformed kernels)."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from reference import reference_conv, sin_loss_and_grads
from resnet_flax.ops import conv, winograd


# The shapes ResNet-50 uses: 1x1 stride 1 and 2, 3x3 'same', 7x7/2 'valid', and the even f=2 'same'.
CASES = [
    ((2, 15, 15, 8), (1, 1, 8, 16), (1, 1), "VALID"),
    ((2, 15, 15, 8), (1, 1, 8, 16), (2, 2), "VALID"),
    ((2, 8, 8, 8), (3, 3, 8, 8), (1, 1), "SAME"),
    ((2, 70, 70, 3), (7, 7, 3, 8), (2, 2), "VALID"),
    ((3, 4, 4, 6), (2, 2, 6, 4), (1, 1), "SAME"),
    ((2, 5, 5, 4), (3, 3, 4, 4), (2, 2), "SAME"),
]


@pytest.mark.parametrize("x_shape, k_shape, strides, padding", CASES)
def test_implementations_match_reference_and_each_other(x_shape, k_shape, strides, padding):
    rng = np.random.default_rng(0)
    x = rng.standard_normal(x_shape).astype(np.float32)
    kernel = rng.standard_normal(k_shape).astype(np.float32)
    expected = reference_conv(x.astype(np.float64), kernel.astype(np.float64), strides, padding)

    def loss(impl):
        return sin_loss_and_grads(lambda x, k: conv.conv2d(x, k, strides, padding, impl))

    outputs = {impl: conv.conv2d(x, kernel, strides, padding, impl) for impl in ("xla", "gemm", "winograd")}
    for impl, out in outputs.items():
        np.testing.assert_allclose(out, expected, rtol=1e-4, atol=1e-4, err_msg=impl)
    (vx, gx), (vg, gg) = loss("xla")(x, kernel), loss("gemm")(x, kernel)
    scale = np.abs(expected).max()
    # sum(sin(y)) may cancel to a small value, so a relative tolerance on it says nothing. sin is
    # 1-Lipschitz: the two losses differ by at most the sum of the outputs' differences, plus the
    # rounding of two float32 sums of n terms (n * eps * sum |sin y| each).
    differences = np.abs(np.asarray(outputs["xla"], np.float64) - np.asarray(outputs["gemm"], np.float64)).sum()
    summation = 2 * expected.size * np.finfo(np.float32).eps * np.abs(np.sin(expected)).sum()
    assert abs(float(vx) - float(vg)) <= differences + summation
    np.testing.assert_allclose(gx[0], gg[0], atol=1e-5 * scale)
    np.testing.assert_allclose(gx[1], gg[1], atol=1e-5 * scale * x_shape[0] * x_shape[1] * x_shape[2])


def test_gemm_kernel_gradient_alone_equals_the_one_with_the_input_gradient():
    # With a fixed input (the stem's image) the custom gradient skips the input gradient.
    rng = np.random.default_rng(1)
    x = rng.standard_normal((2, 9, 9, 3)).astype(np.float32)
    kernel = rng.standard_normal((3, 3, 3, 4)).astype(np.float32)

    def f(x, k):
        return jnp.sum(jnp.sin(conv.conv2d(x, k, (2, 2), "SAME", "gemm")))

    alone = jax.jit(jax.grad(f, argnums=1))(x, kernel)
    both = jax.jit(jax.grad(f, argnums=(0, 1)))(x, kernel)[1]
    np.testing.assert_array_equal(alone, both)
    reference = jax.grad(lambda k: jnp.sum(jnp.sin(conv.conv2d(x, k, (2, 2), "SAME", "xla"))))(kernel)
    np.testing.assert_allclose(alone, reference, rtol=1e-5, atol=1e-4)


def test_tensorflow_same_padding_puts_the_extra_pixel_after():
    assert conv.explicit_padding((4, 4), (2, 2), (1, 1), "SAME") == ((0, 1), (0, 1))
    assert conv.explicit_padding((15, 15), (3, 3), (1, 1), "SAME") == ((1, 1), (1, 1))
    assert conv.explicit_padding((4, 4), (3, 3), (2, 2), "SAME") == ((0, 1), (0, 1))
    assert conv.explicit_padding((9, 9), (7, 7), (2, 2), "VALID") == ((0, 0), (0, 0))


def test_unknown_implementation_is_rejected():
    with pytest.raises(ValueError, match="conv_impl"):
        conv.resolve_impl("fft")


def test_auto_is_winograd_on_cpu_and_xla_elsewhere():
    expected = "winograd" if jax.default_backend() == "cpu" else "xla"
    assert conv.resolve_impl("auto") == expected


# ---------------------------------------------------------------------------------------------
# Evaluation's inference kernels: Winograd's transformed kernels, per-tap kernels on small maps.

@pytest.mark.parametrize("side", [1, 2, 3, 4, 8])
def test_inference_kernels_give_the_convolution(side):
    rng = np.random.default_rng(side)
    x = rng.standard_normal((3, side, side, 16)).astype(np.float32)
    kernel = rng.standard_normal((3, 3, 16, 24)).astype(np.float32) / 12
    expected = reference_conv(x.astype(np.float64), kernel.astype(np.float64), (1, 1), "SAME")
    same3 = ((1, 1), (1, 1))
    derived = conv.inference_kernel(jnp.asarray(kernel), (side, side), (1, 1), same3, "winograd")
    if side >= 4:  # Winograd's transformed kernel, what conv2d would derive
        tile_size = conv.winograd_tile_size(kernel.shape, (1, 1), same3, (side, side))
        np.testing.assert_array_equal(derived, winograd.kernel_tiles(kernel, tile_size))
    else:  # the taps that see the map: only the centre on 1x1, all nine from 2x2 up
        assert isinstance(derived, tuple) and len(derived) == (1 if side == 1 else 9)
    out = jax.jit(conv.conv2d_inference)(x, derived)
    error = np.abs(np.asarray(out, np.float64) - expected).max() / np.abs(expected).max()
    assert error < (1e-5 if side >= 8 else 1e-6), f"relative error {error:.1e}"


def test_tap_regions_cover_every_output_pixel_with_the_taps_that_see_it():
    """Each (tap, input pixel) pair of a 3x3 'same' convolution on a 2x3 map appears exactly once."""
    h, w = 2, 3
    seen = set()
    for (a, b), (rows, cols), (out_rows, out_cols) in conv.tap_regions((h, w)):
        for i, j in itertools.product(range(out_rows.start, out_rows.stop), range(out_cols.start, out_cols.stop)):
            source = (i + a - 1, j + b - 1)
            assert rows.start <= source[0] < rows.stop and cols.start <= source[1] < cols.stop
            seen.add((i, j, a, b))
    expected = {(i, j, a, b) for i, j, a, b in itertools.product(range(h), range(w), range(3), range(3))
                if 0 <= i + a - 1 < h and 0 <= j + b - 1 < w}
    assert seen == expected


def test_only_winograd_layers_have_inference_kernels():
    kernel = jnp.ones((3, 3, 4, 4))
    same3, valid = ((1, 1), (1, 1)), ((0, 0), (0, 0))
    assert conv.inference_kernel(kernel, (8, 8), (1, 1), same3, "gemm") is None
    assert conv.inference_kernel(kernel, (8, 8), (1, 1), same3, "xla") is None
    assert conv.inference_kernel(kernel, (8, 8), (2, 2), same3, "winograd") is None
    assert conv.inference_kernel(kernel, (8, 8), (1, 1), valid, "winograd") is None
    assert conv.inference_kernel(jnp.ones((1, 1, 4, 4)), (2, 2), (1, 1), valid, "winograd") is None
