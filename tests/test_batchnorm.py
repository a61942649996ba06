"""resnet_flax.batchnorm against flax.linen.BatchNorm (+ ReLU) applied to conv output + bias."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from resnet_flax.layers import BatchNorm

SHAPE = (8, 5, 5, 16)
rng = np.random.default_rng(0)
X = jnp.asarray(rng.standard_normal(SHAPE, np.float32) * 3 + 1)
CONV_BIAS = jnp.asarray(rng.standard_normal(SHAPE[-1]).astype(np.float32))
COTANGENT = jnp.asarray(rng.standard_normal(SHAPE, np.float32))
PARAMS = {"scale": jnp.asarray(rng.random(SHAPE[-1], np.float32) + 0.5),
          "bias": jnp.asarray(rng.standard_normal(SHAPE[-1]).astype(np.float32))}
STATS = {"mean": jnp.asarray(rng.standard_normal(SHAPE[-1]).astype(np.float32)),
         "var": jnp.asarray(rng.random(SHAPE[-1], np.float32) + 0.5)}
MASK = jnp.asarray([True, True, False, True, True, True, False, True]).reshape(-1, 1, 1, 1)
KERAS = dict(momentum=0.99, epsilon=1e-3)


def reference(params, x, conv_bias, train, mask, relu):
    """flax's layer on ``x + conv_bias``, then ReLU: what the model computed before."""
    y, updates = nn.BatchNorm(use_running_average=not train, **KERAS).apply(
        {"params": params, "batch_stats": STATS}, x + conv_bias, mask=mask, mutable=["batch_stats"])
    return (nn.relu(y) if relu else y), updates["batch_stats"]


def ours(params, x, conv_bias, train, mask, relu):
    y, updates = BatchNorm(use_running_average=not train, **KERAS).apply(
        {"params": params, "batch_stats": STATS}, x, conv_bias, mask=mask, relu=relu, mutable=["batch_stats"])
    return y, updates["batch_stats"]


def test_variables_have_flax_names_and_shapes():
    theirs = nn.BatchNorm(use_running_average=False).init(jax.random.key(0), X)
    mine = BatchNorm(use_running_average=False).init(jax.random.key(0), X)
    assert jax.tree.map(jnp.shape, mine) == jax.tree.map(jnp.shape, theirs)
    for a, b in zip(jax.tree.leaves(mine), jax.tree.leaves(theirs)):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("relu", [False, True])
@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("train", [False, True])
def test_outputs_statistics_and_gradients_equal_flax(train, masked, relu):
    mask = MASK if masked else None

    def loss(layer):
        def fn(params, x, conv_bias):
            y, stats = layer(params, x, conv_bias, train, mask, relu)
            return jnp.sum(y * COTANGENT), (y, stats)
        return jax.value_and_grad(fn, argnums=(0, 1, 2), has_aux=True)

    (_, (y_ref, stats_ref)), grads_ref = loss(reference)(PARAMS, X, CONV_BIAS)
    (_, (y, stats)), grads = loss(ours)(PARAMS, X, CONV_BIAS)
    if relu:
        assert 0 < float(jnp.mean(y > 0)) < 1  # the gate is exercised both ways
    np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=2e-6)
    for name in ("mean", "var"):  # running statistics, moved by the momentum rule in training
        np.testing.assert_allclose(stats[name], stats_ref[name], rtol=1e-5, atol=1e-6, err_msg=name)
    (d_params, d_x, d_conv_bias), (d_params_ref, d_x_ref, d_conv_bias_ref) = grads, grads_ref
    np.testing.assert_allclose(d_x, d_x_ref, rtol=1e-4, atol=2e-6)
    for name in ("scale", "bias"):
        np.testing.assert_allclose(d_params[name], d_params_ref[name], rtol=1e-5, atol=2e-5, err_msg=name)
    if train:
        # The batch mean takes the conv bias out again: its gradient is zero, exactly, where op by
        # op differentiation leaves rounding noise.
        np.testing.assert_array_equal(d_conv_bias, np.zeros(SHAPE[-1], np.float32))
    else:
        np.testing.assert_allclose(d_conv_bias, d_conv_bias_ref, rtol=1e-5, atol=1e-5)


def test_padding_examples_do_not_count():
    """Statistics of a masked batch equal those of its real examples alone; the padded examples'
    values do not change any real example's output or gradient."""
    kept = np.asarray(MASK).ravel()

    def run(x, mask, rows):
        def fn(params, x):  # the loss sees the real examples only, as in training
            y, stats = ours(params, x, CONV_BIAS, True, mask, True)
            return jnp.sum(y[rows] * COTANGENT[kept]), (y, stats)
        return jax.value_and_grad(fn, argnums=(0, 1), has_aux=True)(PARAMS, x)

    (_, (y_masked, stats_masked)), (dp_masked, dx_masked) = run(X.at[~kept].set(1e3), MASK, kept)
    (_, (y_alone, stats_alone)), (dp_alone, dx_alone) = run(X[kept], None, slice(None))
    np.testing.assert_allclose(y_masked[kept], y_alone, rtol=1e-5, atol=1e-6)
    for name in ("mean", "var"):
        np.testing.assert_allclose(stats_masked[name], stats_alone[name], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(dx_masked[kept], dx_alone, rtol=1e-4, atol=1e-6)
    np.testing.assert_array_equal(dx_masked[~kept], 0.0)
    for name in ("scale", "bias"):
        np.testing.assert_allclose(dp_masked[name], dp_alone[name], rtol=1e-5, atol=1e-6)
