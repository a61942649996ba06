"""pooling.max_pool against flax's nn.max_pool: the same outputs and gradients (bit for bit on CPU)."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from resnet_flax.ops import pooling

# The stem's 3x3/2 pool, an uneven window and stride, and non-overlapping windows.
CASES = [
    ((3, 17, 17, 5), (3, 3), (2, 2)),
    ((2, 9, 7, 3), (2, 3), (1, 2)),
    ((2, 8, 8, 4), (2, 2), (2, 2)),
]


def flax_max_pool(x, window, strides):
    return nn.max_pool(x, window, strides=strides, padding="VALID")


def max_of_stacked_taps(x, window, strides):
    """The naive pool: jnp.max over the stacked taps, whose gradient splits ties evenly."""
    return jnp.max(jnp.stack(list(pooling.window_taps(x, window, strides))), axis=0)


def inputs_with_ties(shape, seed=0):
    """Small integers, half of them clipped to 0 as after a ReLU: most windows hold tied maxima."""
    rng = np.random.default_rng(seed)
    return np.maximum(np.round(rng.standard_normal(shape) * 2), 0).astype(np.float32)


@pytest.mark.parametrize("shape,window,strides", CASES)
@pytest.mark.parametrize("ties", [True, False])
def test_output_and_gradient_equal_flax(shape, window, strides, ties):
    x = inputs_with_ties(shape) if ties else np.random.default_rng(1).standard_normal(shape).astype(np.float32)
    ours = jax.jit(lambda x: pooling.max_pool(x, window, strides))
    theirs = jax.jit(lambda x: flax_max_pool(x, window, strides))
    np.testing.assert_array_equal(ours(x), theirs(x))

    weights = np.random.default_rng(2).standard_normal(theirs(x).shape).astype(np.float32)
    grad = lambda pool: jax.jit(jax.grad(lambda x: jnp.sum(pool(x, window, strides) * weights)))(x)
    ours_grad, theirs_grad = grad(pooling.max_pool), grad(flax_max_pool)
    if jax.default_backend() == "cpu":
        # Ties go to the same input pixel, and overlapping windows add up in the same order.
        np.testing.assert_array_equal(ours_grad, theirs_grad)
    else:  # a GPU's select-and-scatter adds overlapping windows in its own order
        np.testing.assert_allclose(ours_grad, theirs_grad, rtol=1e-6, atol=1e-6)
    if ties:  # the inputs really have ties: sharing a tied maximum's gradient would not pass
        shared = jax.grad(lambda x: jnp.sum(max_of_stacked_taps(x, window, strides) * weights))(x)
        assert not np.allclose(shared, theirs_grad)


def test_nan_in_a_window_gives_nan_like_flax():
    x = inputs_with_ties((1, 5, 5, 2))
    x[0, 2, 3, 1] = np.nan  # sits in two overlapping 3x3/2 windows
    ours = np.asarray(pooling.max_pool(x, (3, 3), (2, 2)))
    theirs = np.asarray(flax_max_pool(x, (3, 3), (2, 2)))
    np.testing.assert_array_equal(np.isnan(ours), np.isnan(theirs))
    assert np.isnan(ours).sum() == 2
    np.testing.assert_array_equal(ours[~np.isnan(ours)], theirs[~np.isnan(theirs)])


@pytest.mark.parametrize("shape,window,strides,message", [
    ((4, 4, 3), (2, 2), (2, 2), "NHWC"),
    ((1, 4, 4, 3), (2, 2, 2), (2, 2), "two entries"),
    ((1, 4, 4, 3), (5, 5), (1, 1), "larger than the input"),
    ((1, 16, 16, 3), (12, 12), (1, 1), "int8"),
])
def test_bad_arguments_are_named(shape, window, strides, message):
    with pytest.raises(ValueError, match=message):
        pooling.max_pool(jnp.zeros(shape), window, strides)
