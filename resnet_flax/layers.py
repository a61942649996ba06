"""The Keras-semantics flax layers the assignment's blocks are built from: ``Conv2D`` and
``BatchNorm``, computed by the kernels in ``resnet_flax.ops``.

They keep Keras's parameter and ``batch_stats`` names and shapes, so Keras weights and
checkpoints load whichever kernels compute them. The same layers with PyTorch's conventions (no
conv bias, symmetric padding, BatchNorm epsilon 1e-5, momentum 0.9 in flax's sense) build the
torchvision and pre-activation layouts (``resnet_flax.imagenet_layouts``).

``dtype`` is the compute dtype: parameters and BatchNorm statistics stay float32; with bfloat16,
convolutions take bfloat16 inputs and kernels, and BatchNorm computes its statistics in float32
and hands bfloat16 on (mixed precision, as flax's ImageNet example trains on TPU).
"""

from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from resnet_flax.ops import batchnorm, conv
from resnet_flax.ops.conv_plan import ConvPlan, layer_spec

# Keras BatchNormalization defaults (Flax's own are momentum 0.99, epsilon 1e-5).
BN_MOMENTUM = 0.99
BN_EPSILON = 1e-3


class Conv2D(nn.Module):
    """Keras ``Conv2D``: bias on, Glorot-uniform kernel, zero bias, 'VALID' or TF 'SAME' padding
    (or explicit (before, after) pairs); ``use_bias=False`` for PyTorch-style layouts.

    ``impl`` and ``precision`` choose how ``convolve`` (``ops.conv.conv2d``, or a variant with its
    signature, for experiments) computes it; ``models.create_model`` sets them for the whole model.
    A ``plan`` (``resnet_flax.autotune``) names the kernel for this layer's shape, where it has one.
    """

    features: int
    kernel_size: tuple[int, int]
    strides: tuple[int, int] = (1, 1)
    padding: str | conv.Padding = "VALID"
    use_bias: bool = True
    impl: str = "auto"
    plan: ConvPlan | None = None
    precision: str | None = "highest"
    dtype: Any = None  # compute dtype; None = float32
    kernel_init: nn.initializers.Initializer = nn.initializers.glorot_uniform()
    bias_init: nn.initializers.Initializer = nn.initializers.zeros_init()
    convolve: Callable[..., jax.Array] = conv.conv2d

    @nn.compact
    def __call__(self, x: jax.Array, *, defer_bias: bool = False):
        """The convolution plus bias; with ``defer_bias``, the pair (convolution, bias or None)
        instead, for a following ``BatchNorm`` to take the bias in (``input_bias``) without a pass
        of its own."""
        kernel_shape = (*self.kernel_size, x.shape[-1], self.features)
        kernel = self.param("kernel", self.kernel_init, kernel_shape, jnp.float32)
        bias = self.param("bias", self.bias_init, (self.features,), jnp.float32) if self.use_bias else None
        if self.dtype is not None:
            x, kernel = x.astype(self.dtype), kernel.astype(self.dtype)
        derived = self._inference_kernel(kernel, x)
        if derived is None:
            y = self.convolve(x, kernel, self.strides, self.padding, self._kernel_for(x, kernel), self.precision)
        else:
            y = conv.conv2d_inference(x, derived, self.precision)
        if defer_bias:
            return y, bias
        return y if bias is None else y + bias.astype(y.dtype)

    def _inference_kernel(self, kernel: jax.Array, x: jax.Array):
        """The ``ops.conv.inference_kernel`` where evaluation supplies ``INFERENCE_KERNELS`` (or
        derives them: the collection mutable outside ``init``), else None."""
        if self.has_variable(conv.INFERENCE_KERNELS, "kernel"):
            return self.get_variable(conv.INFERENCE_KERNELS, "kernel")
        if self.is_initializing() or not self.is_mutable_collection(conv.INFERENCE_KERNELS):
            return None
        pads = conv.explicit_padding(x.shape[1:3], self.kernel_size, self.strides, self.padding)
        derived = conv.inference_kernel(kernel, x.shape[1:3], self.strides, pads, self._kernel_for(x, kernel))
        if derived is not None:
            self.put_variable(conv.INFERENCE_KERNELS, "kernel", derived)
        return derived

    @nn.nowrap  # a plain method: it returns a name, which flax would capture as an intermediate
    def _kernel_for(self, x: jax.Array, kernel: jax.Array) -> str:
        """The plan's kernel for this layer's shape, else ``impl`` (its static rule)."""
        if self.plan is None:
            return self.impl
        pads = conv.explicit_padding(x.shape[1:3], self.kernel_size, self.strides, self.padding)
        spec = layer_spec(self.plan.mode, x.shape, kernel.shape, self.strides, pads, x.dtype)
        return self.plan.get(spec.key) or self.impl


class BatchNorm(nn.Module):
    """Keras ``BatchNormalization`` over the last axis of ``x + input_bias``.

    The same ``scale``/``bias`` parameters and ``batch_stats`` (``mean``, ``var``) as
    ``flax.linen.BatchNorm``. ``mask`` (one bool per example, any shape that reshapes to (N,))
    keeps padding examples out of the batch statistics; ``relu=True`` rectifies the output in the
    same pass. Training mode runs ``normalize`` (``ops.batchnorm.normalize_batch``, or a variant
    with its signature, for experiments).
    """

    use_running_average: bool
    momentum: float = BN_MOMENTUM
    epsilon: float = BN_EPSILON
    dtype: Any = None  # the output's dtype; None = float32. Statistics are always float32.
    normalize: Callable = batchnorm.normalize_batch

    @nn.compact
    def __call__(self, x: jax.Array, input_bias: jax.Array | None = None, *, mask: jax.Array | None = None,
                 relu: bool = False) -> jax.Array:
        out = self._normalized(x.astype(jnp.float32), input_bias, mask, relu)
        return out if self.dtype is None else out.astype(self.dtype)

    def _normalized(self, x, input_bias, mask, relu):
        features = x.shape[-1]
        scale = self.param("scale", nn.initializers.ones, (features,), jnp.float32)
        bias = self.param("bias", nn.initializers.zeros, (features,), jnp.float32)
        running_mean = self.variable("batch_stats", "mean", jnp.zeros, (features,), jnp.float32)
        running_var = self.variable("batch_stats", "var", jnp.ones, (features,), jnp.float32)
        if input_bias is None:
            input_bias = jnp.zeros((features,), jnp.float32)

        if self.use_running_average:
            multiplier = lax.rsqrt(running_var.value + self.epsilon) * scale
            out = (x - (running_mean.value - input_bias)) * multiplier + bias
            return jnp.maximum(out, 0.0) if relu else out

        weight = jnp.ones((x.shape[0],), jnp.float32) if mask is None else (
            jnp.reshape(mask, (x.shape[0],)).astype(jnp.float32))
        out, mean, var = self.normalize(x, input_bias, scale, bias, weight, self.epsilon, relu)
        if not self.is_initializing():
            running_mean.value = self.momentum * running_mean.value + (1.0 - self.momentum) * mean
            running_var.value = self.momentum * running_var.value + (1.0 - self.momentum) * var
        return out
