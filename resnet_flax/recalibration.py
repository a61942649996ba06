"""BatchNorm re-estimation ("precise BN"): replace the running statistics by the average of exact
batch statistics over training batches, with the weights frozen.

Why: BatchNorm's running averages move 1% per step (momentum 0.99), so after the assignment's
2 epochs (68 steps) they still remember a large share of their initial values (0 and 1) and of
early, very different weights: inference-mode accuracy collapses while training accuracy is fine.
Averaging the statistics that the final weights produce fixes that without training further.
"""

import jax
import jax.numpy as jnp
from jax import lax

from resnet_flax import input_pipeline, layers


def batch_statistics(apply_fn, variables, batch, momentum: float = layers.BN_MOMENTUM,
                     normalization: str = "unit"):
    """Every BatchNorm layer's mean and variance on one (masked) batch, in training-mode forward.

    Flax's update is ``new = momentum * old + (1 - momentum) * batch``; run from zeros it gives
    ``(1 - momentum) * batch``, which is divided out.
    """
    zeros = jax.tree.map(jnp.zeros_like, variables["batch_stats"])
    _, updates = apply_fn({"params": variables["params"], "batch_stats": zeros},
                          input_pipeline.normalize(batch["image"], normalization), train=True, mask=batch["mask"],
                          mutable=["batch_stats"])
    return jax.tree.map(lambda s: s / (1.0 - momentum), updates["batch_stats"])


def make_recalibrate(apply_fn, momentum: float = layers.BN_MOMENTUM, normalization: str = "unit"):
    """``(variables, batches) -> variables`` whose batch_stats are the averages over ``batches``
    (arrays of shape (steps, batch, ...)) of each batch's statistics."""

    def recalibrate(variables, batches):
        def add(total, batch):
            stats = batch_statistics(apply_fn, variables, batch, momentum, normalization)
            return jax.tree.map(jnp.add, total, stats), None

        zeros = jax.tree.map(jnp.zeros_like, variables["batch_stats"])
        total, _ = lax.scan(add, zeros, batches)
        steps = batches["mask"].shape[0]
        return {**variables, "batch_stats": jax.tree.map(lambda t: t / steps, total)}

    return jax.jit(recalibrate)
