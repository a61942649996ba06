"""The convolution implementations against a direct NumPy convolution with TensorFlow padding."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from resnet_flax import conv, winograd


def reference_conv(x, kernel, strides, padding):
    """A loop-over-taps convolution written from the definition, with TF padding computed by hand."""
    n, h, w, cin = x.shape
    kh, kw, _, cout = kernel.shape
    sh, sw = strides
    if padding == "SAME":
        oh, ow = -(-h // sh), -(-w // sw)
        ph, pw = max((oh - 1) * sh + kh - h, 0), max((ow - 1) * sw + kw - w, 0)
        x = np.pad(x, ((0, 0), (ph // 2, ph - ph // 2), (pw // 2, pw - pw // 2), (0, 0)))
    else:
        oh, ow = (h - kh) // sh + 1, (w - kw) // sw + 1
    out = np.zeros((n, oh, ow, cout), np.float64)
    for i, j in itertools.product(range(kh), range(kw)):
        patch = x[:, i:i + sh * (oh - 1) + 1:sh, j:j + sw * (ow - 1) + 1:sw, :]
        out += patch @ kernel[i, j]
    return out


def sin_loss_and_grads(conv_fn):
    """``sum(sin(conv_fn(x, k)))`` and its gradients for ``x`` and ``k``, jitted."""
    return jax.jit(jax.value_and_grad(lambda x, k: jnp.sum(jnp.sin(conv_fn(x, k))), argnums=(0, 1)))


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
    np.testing.assert_allclose(vx, vg, rtol=1e-5)
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


# ---------------------------------------------------------------------------------------------
# Winograd: F(2x2, 3x3) and F(4x4, 3x3) on the maps ResNet-50 has (15x15 and 8x8 take F(4x4),
# 4x4 F(2x2)), odd sizes that leave a partial tile, and unequal channel counts.

WINOGRAD_CASES = [(15, 4), (8, 4), (7, 2), (4, 2), (5, 4), (6, 2)]


def reference_sin_loss_grads(x, kernel):
    """Gradients of sum(sin(conv(x, kernel))), 3x3 'same', in float64 by NumPy: the kernel's from
    the definition, the input's as the adjoint sum over taps."""
    y = reference_conv(x, kernel, (1, 1), "SAME")
    d_out = np.cos(y)
    padded = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    h, w = x.shape[1:3]
    d_kernel = np.zeros_like(kernel)
    d_padded = np.zeros_like(padded)
    for i, j in itertools.product(range(3), range(3)):
        d_kernel[i, j] = np.einsum("nhwc,nhwo->co", padded[:, i:i + h, j:j + w], d_out)
        d_padded[:, i:i + h, j:j + w] += d_out @ kernel[i, j].T
    return y, d_padded[:, 1:-1, 1:-1], d_kernel


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


def test_conv2d_layer_uses_inference_kernels_only_when_evaluation_supplies_them():
    layer = conv.Conv2D(8, (3, 3), padding="SAME", impl="winograd")
    x = jnp.asarray(np.random.default_rng(0).standard_normal((2, 2, 2, 4)).astype(np.float32))
    variables = layer.init(jax.random.key(0), x)
    assert set(variables) == {"params"}  # init derives nothing: checkpoints hold the kernel alone
    plain = layer.apply(variables, x)
    derived_out, derived = layer.apply(variables, x, mutable=[conv.INFERENCE_KERNELS])
    assert len(derived[conv.INFERENCE_KERNELS]["kernel"]) == 9
    np.testing.assert_allclose(derived_out, plain, rtol=1e-5, atol=1e-6)
    # Supplied kernels are what the layer multiplies by: zero taps give the bias alone.
    zeros = jax.tree.map(jnp.zeros_like, derived)
    np.testing.assert_array_equal(layer.apply({**variables, **zeros}, x),
                                  jnp.broadcast_to(variables["params"]["bias"], plain.shape))
