"""The ResNets of the PyTorch world as ``flax.linen`` modules: torchvision's layout (ResNet v1.5)
and the pre-activation ResNet of He et al. (2016), "Identity Mappings in Deep Residual Networks".

torchvision's layout (``torchvision.models.resnet``), which timm's ``resnet*`` share:

* stem: 7x7/2 conv (padding 3, no bias) -> BatchNorm -> ReLU -> 3x3/2 max pool (padding 1);
* blocks: the basic block (two 3x3 convs) of ResNet-18/34 or the bottleneck (1x1, 3x3, 1x1, the
  output 4x the width) of ResNet-50 and deeper, the stride on the 3x3 conv ("v1.5"); a projection
  shortcut (strided 1x1 conv, no bias, and BatchNorm) where the shape changes, the identity
  elsewhere; no conv biases;
* head: global average pooling -> ``fc``. BatchNorm epsilon 1e-5 and momentum 0.1 in PyTorch's
  sense (0.9 in flax's); convs start from Kaiming-normal (fan-out) and ``fc`` from PyTorch's
  ``nn.Linear`` default, as torchvision's do.

Module names are torchvision's ``state_dict`` names with ``_`` for the dots between a name and an
index: ``layer1.0.downsample.1.running_mean`` is ``batch_stats['layer1_0']['downsample_1']['mean']``
(``resnet_flax.torch_io`` maps them).

The pre-activation layout keeps that stem and those widths, and moves each BatchNorm and ReLU
before its conv (BN -> ReLU -> conv); the shortcut adds the block's input unchanged, or a
projection (conv only) of its pre-activated input; a final BatchNorm and ReLU (``post_bn``) precede
the pooling. As in fb.resnet.torch's ``preresnet`` for ImageNet, the network's first block takes
the stem's already activated output without a pre-activation of its own.

The max pool pads with zeros, not minus infinity: its input is a ReLU's output, so every window
holds a real value >= any padding and the result is the same.
"""

import functools
import math
from collections.abc import Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from resnet_flax import layers
from resnet_flax.ops.pooling import max_pool

ModuleDef = Callable[..., nn.Module]

BN_MOMENTUM = 0.9  # PyTorch's momentum=0.1: running = 0.9 * running + 0.1 * batch
BN_EPSILON = 1e-5
# torchvision: nn.init.kaiming_normal_(mode='fan_out', nonlinearity='relu'), not truncated.
CONV_INIT = nn.initializers.variance_scaling(2.0, "fan_out", "normal")


def linear_bias_init(fan_in: int):
    """PyTorch's ``nn.Linear`` bias initialisation: uniform in +-1/sqrt(fan_in)."""
    bound = 1.0 / math.sqrt(fan_in)
    return lambda key, shape, dtype=jnp.float32: jax.random.uniform(key, shape, dtype, -bound, bound)


# PyTorch's nn.Linear weight: kaiming_uniform_(a=sqrt(5)), i.e. uniform in +-1/sqrt(fan_in).
LINEAR_KERNEL_INIT = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


def _pad(size: int) -> tuple[tuple[int, int], tuple[int, int]]:
    return ((size, size), (size, size))


class Bottleneck(nn.Module):
    """torchvision's ``Bottleneck`` (the stride on ``conv2``); ``preact`` for the pre-activation one."""

    filters: Sequence[int]  # (width, width, 4 * width) for torchvision's
    strides: int = 1
    conv: ModuleDef = layers.Conv2D
    norm: ModuleDef = layers.BatchNorm
    residual: bool = True
    preact: bool = False
    activate_input: bool = True  # pre-activation only: False for the network's first block

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool, mask: jax.Array | None = None) -> jax.Array:
        f1, f2, f3 = self.filters
        windows = ((f1, 1, 1, 0), (f2, 3, self.strides, 1), (f3, 1, 1, 0))
        return _block(self, x, windows, train, mask)


class BasicBlock(nn.Module):
    """torchvision's ``BasicBlock`` (two 3x3 convs); ``preact`` for the pre-activation one."""

    filters: Sequence[int]  # (width, width)
    strides: int = 1
    conv: ModuleDef = layers.Conv2D
    norm: ModuleDef = layers.BatchNorm
    residual: bool = True
    preact: bool = False
    activate_input: bool = True

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool, mask: jax.Array | None = None) -> jax.Array:
        f1, f2 = self.filters
        windows = ((f1, 3, self.strides, 1), (f2, 3, 1, 1))
        return _block(self, x, windows, train, mask)


def _block(block, x, windows, train, mask):
    """Either block kind, from its convs' (filters, window, stride, padding); called inside the
    block's compact ``__call__``, so the layers belong to it."""
    norm = functools.partial(block.norm, use_running_average=not train)
    projects = block.strides != 1 or x.shape[-1] != windows[-1][0]

    def conv(features, window, strides, padding, name):
        return block.conv(features, (window, window), strides=(strides, strides), padding=_pad(padding),
                          name=name)

    if block.preact:
        if block.activate_input:
            x = norm(name="bn1")(x, mask=mask, relu=True)
        if block.residual and projects:
            shortcut = conv(windows[-1][0], 1, block.strides, 0, "downsample_0")(x)
        else:
            shortcut = x
        for index, (features, window, strides, padding) in enumerate(windows, start=1):
            if index > 1:
                x = norm(name=f"bn{index}")(x, mask=mask, relu=True)
            x = conv(features, window, strides, padding, f"conv{index}")(x)
        return x + shortcut if block.residual else x

    shortcut = x
    for index, (features, window, strides, padding) in enumerate(windows, start=1):
        x = conv(features, window, strides, padding, f"conv{index}")(x)
        x = norm(name=f"bn{index}")(x, mask=mask, relu=index < len(windows))
    if block.residual:
        if projects:
            shortcut = conv(windows[-1][0], 1, block.strides, 0, "downsample_0")(shortcut)
            shortcut = norm(name="downsample_1")(shortcut, mask=mask)
        x = x + shortcut
    return nn.relu(x)


class ImageNetResNet(nn.Module):
    """torchvision's ResNet (``preact=False``) or the pre-activation ResNet (``preact=True``).

    Attributes:
      num_classes: size of the output layer ``fc``.
      stage_sizes: blocks per stage (ResNet-50: 3, 4, 6, 3).
      stage_filters: each stage's block filters: (width, width) for basic blocks, (width, width,
        4 * width) for bottlenecks.
      stem_features: filters of ``conv1``.
      conv, norm, dense: module factories (``models.layer_factories``).
      residual: False builds the plain twin: no shortcut additions (and no projections).
    """

    num_classes: int
    stage_sizes: Sequence[int] = (3, 4, 6, 3)
    stage_filters: Sequence[Sequence[int]] = ((64, 64, 256), (128, 128, 512), (256, 256, 1024), (512, 512, 2048))
    stem_features: int = 64
    conv: ModuleDef = layers.Conv2D
    norm: ModuleDef = layers.BatchNorm
    dense: ModuleDef = nn.Dense
    residual: bool = True
    preact: bool = False

    @property
    def head_name(self) -> str:
        return "fc"

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool, mask: jax.Array | None = None) -> jax.Array:
        """Logits for NHWC images ``x`` (``mask``: as ``models.ResNet``)."""
        if mask is not None:
            mask = mask.reshape(-1, 1, 1, 1)
        norm = functools.partial(self.norm, use_running_average=not train)
        x = self.conv(self.stem_features, (7, 7), strides=(2, 2), padding=_pad(3), name="conv1")(x)
        x = norm(name="bn1")(x, mask=mask, relu=True)
        x = max_pool(jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0))), (3, 3), strides=(2, 2))
        self.sow("intermediates", "stem", x)

        for index, (num_blocks, filters) in enumerate(zip(self.stage_sizes, self.stage_filters)):
            block_class = Bottleneck if len(filters) == 3 else BasicBlock
            for b in range(num_blocks):
                strides = 2 if index > 0 and b == 0 else 1
                x = block_class(filters=filters, strides=strides, conv=self.conv, norm=self.norm,
                                residual=self.residual, preact=self.preact,
                                activate_input=not (index == 0 and b == 0),
                                name=f"layer{index + 1}_{b}")(x, train=train, mask=mask)
            self.sow("intermediates", f"layer{index + 1}", x)

        if self.preact:
            x = norm(name="post_bn")(x, mask=mask, relu=True)
        x = jnp.mean(x.astype(jnp.float32), axis=(1, 2))
        logits = self.dense(self.num_classes, kernel_init=LINEAR_KERNEL_INIT,
                            bias_init=linear_bias_init(x.shape[-1]), name="fc")(x)
        return logits.astype(jnp.float32)
