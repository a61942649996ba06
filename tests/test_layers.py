"""The Keras-semantics layers: Conv2D's evaluation-only kernels. (BatchNorm: test_batchnorm.py.)"""

import jax
import jax.numpy as jnp
import numpy as np

from resnet_flax import layers
from resnet_flax.ops import conv


def test_conv2d_layer_uses_inference_kernels_only_when_evaluation_supplies_them():
    layer = layers.Conv2D(8, (3, 3), padding="SAME", impl="winograd")
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
