"""Batch normalisation of NHWC activations in training mode (``normalize_batch``), with a
hand-written gradient, the preceding conv's bias taken in, and an optional ReLU folded in; the
flax layer around it is ``layers.BatchNorm``.

It computes what ``flax.linen.BatchNorm`` computes on ``x + input_bias``, up to float rounding
(statistics over batch, height and width, variance as E[x^2] - E[x]^2 clipped at 0). It differs
in how the work is laid out, because on a CPU these layers are bound by memory traffic, not
arithmetic:

* Forward: two reductions over the input and one pass that writes the normalised (and, with
  ``relu=True``, rectified) output. The padding mask weights per-example sums, so no masked copy
  of the activations is made.
* Backward: the closed form ``dx = scale / sigma * (dy - w (sum dy + xhat * sum dy*xhat) / n)``
  (``w`` 1 for counted examples, 0 for padding), from two reductions and one elementwise pass that
  recompute ``xhat`` from the saved input instead of storing it; the ReLU's gate comes from the
  output, which the next layer keeps anyway.
* ``input_bias``, the preceding conv's bias, is added inside the layer: in training mode the
  output does not depend on it (the batch mean takes it out again), so its gradient is exactly
  zero, where ``conv + bias -> BatchNorm`` differentiated op by op gives float rounding noise that
  Adam scales up to steps of about +-lr. It still enters the running mean, as in Keras.
"""

import functools

import jax
import jax.numpy as jnp
from jax import lax

_REDUCED = (0, 1, 2)  # batch, height, width: the statistics are per channel


def _weighted_sum(per_example: jax.Array, weight: jax.Array) -> jax.Array:
    """Sum over examples of (N, C) partial sums, each counted with its example's weight."""
    return jnp.sum(per_example * weight[:, None], axis=0)


def _two_sums(a: jax.Array, b: jax.Array, axes: tuple[int, ...]) -> tuple[jax.Array, jax.Array]:
    """``(sum a, sum b)`` over ``axes``: two plain reductions, which XLA:CPU runs fast (one variadic
    reduction reading both at once is far slower there; experiments/ab_chunk.py)."""
    return jnp.sum(a, axis=axes), jnp.sum(b, axis=axes)


def _statistics(x: jax.Array, weight: jax.Array):
    """Mean, clipped variance, unclipped variance and element count of the weighted examples."""
    height, width = x.shape[1:3]
    count = jnp.maximum(jnp.sum(weight) * (height * width), 1.0)
    sums, sums_of_squares = _two_sums(x, x * x, (1, 2))
    mean = _weighted_sum(sums, weight) / count
    mean_of_squares = _weighted_sum(sums_of_squares, weight) / count
    raw_var = mean_of_squares - mean * mean
    return mean, jnp.maximum(0.0, raw_var), raw_var, count


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6))
def normalize_batch(x, input_bias, scale, bias, weight, epsilon: float, relu: bool):
    """``(out, mean, var)``: ``x + input_bias`` normalised with the statistics of the examples whose
    ``weight`` is 1 (the others are normalised with them but do not count), scaled, shifted and,
    with ``relu``, rectified; and those statistics (biased variance)."""
    return _forward(x, input_bias, scale, bias, weight, epsilon, relu)[0]


def _forward(x, input_bias, scale, bias, weight, epsilon, relu):
    mean, var, raw_var, count = _statistics(x, weight)
    out = (x - mean) * (lax.rsqrt(var + epsilon) * scale) + bias  # flax's order of operations
    if relu:
        out = jnp.maximum(out, 0.0)
    # The rectified output is the next layer's input anyway: keeping it for the ReLU's gate costs
    # no memory, where recomputing the gate would keep the centred input alive instead.
    gate = out if relu else None
    return (out, mean + input_bias, var), (x, gate, scale, weight, mean, var, raw_var, count)


def _backward(epsilon, relu, residuals, cotangents):
    x, gate, scale, weight, mean, var, raw_var, count = residuals
    d_out, d_mean, d_var = cotangents
    inv_sigma = lax.rsqrt(var + epsilon)
    # Written apart from the forward's (x - mean) so that XLA does not keep a centred copy of x
    # from the forward pass for this: each pass below recomputes it on the fly.
    x_hat = x * inv_sigma - mean * inv_sigma
    if relu:  # jax.nn.relu's gate: the gradient passes where the output is positive
        d_out = jnp.where(gate > 0, d_out, 0.0)
    sum_d_out, sum_d_out_x_hat = _two_sums(d_out, d_out * x_hat, _REDUCED)
    # The totals through the statistics: d mean / d x_i = w_i / n, d var / d x_i = 2 w_i (x_i -
    # mean) / n, the latter only where the variance is not clipped (half at 0, as jnp.maximum).
    var_gate = jnp.where(raw_var > 0, 1.0, jnp.where(raw_var == 0, 0.5, 0.0))
    d_var_total = var_gate * (d_var - 0.5 * scale * inv_sigma * inv_sigma * sum_d_out_x_hat)
    d_mean_total = d_mean - scale * inv_sigma * sum_d_out
    counted = weight[:, None, None, None] / count
    d_x = scale * inv_sigma * d_out + counted * (d_mean_total + 2.0 * d_var_total * (x - mean))
    # The output ignores input_bias; only the returned mean moves with it.
    return d_x, d_mean, sum_d_out_x_hat, sum_d_out, jnp.zeros_like(weight)


normalize_batch.defvjp(_forward, _backward)
