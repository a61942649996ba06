"""The assignment's ResNet-50 as ``flax.linen`` modules, with Keras semantics and layer names.

Layer (module) names are the assignment's Keras names: ``conv1``, ``bn_conv1``,
``res{stage}{block}_branch2a/2b/2c``, ``bn{stage}{block}_branch2a/2b/2c``, the shortcut
``res{stage}{block}_branch1`` / ``bn{stage}{block}_branch1`` and ``fc{num_classes}``. Each block is a
module named ``block{stage}{block}`` that holds its layers, so ``res2a_branch2a`` lives at
``params['block2a']['res2a_branch2a']``; :func:`keras_layer_paths` lists every name with its path.

Keras defaults where they differ from Flax's: conv bias on, Glorot-uniform kernels, BatchNorm
epsilon 1e-3 and momentum 0.99, TensorFlow 'SAME' padding (``resnet_flax.layers``). The mode is
always explicit: ``model.apply(variables, x, train=...)``; ``train=True`` needs
``mutable=['batch_stats']``.

As in flax's own ImageNet ResNet, the blocks receive their layers as module factories (``conv``,
``norm``; ``functools.partial`` of ``layers.Conv2D`` and ``layers.BatchNorm``), which
:func:`create_model` resolves once from the config: which kernels compute the convolutions and at
what precision is decided there, not in the architecture.
"""

import functools
import string
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from resnet_flax import layers
from resnet_flax.errors import UserError
from resnet_flax.ops import conv as conv_ops
from resnet_flax.ops.pooling import max_pool

ModuleDef = Callable[..., nn.Module]


def layer_name_bases(stage: int | str, block: str) -> tuple[str, str]:
    """The assignment's ``conv_name_base`` and ``bn_name_base``."""
    return f"res{stage}{block}_branch", f"bn{stage}{block}_branch"


def conv_batchnorm(conv: ModuleDef, norm: ModuleDef, x: jax.Array, filters: int, window: int,
                   conv_name: str, bn_name: str, *, strides: int = 1, padding: str = "VALID",
                   relu: bool = False, train: bool, mask: jax.Array | None) -> jax.Array:
    """Keras ``Conv2D`` (``conv_name``) -> ``BatchNormalization`` (``bn_name``) [-> ReLU], inside the
    calling module. The conv's bias is added inside the BatchNorm (see ``resnet_flax.ops.batchnorm``)."""
    x, conv_bias = conv(filters, (window, window), strides=(strides, strides), padding=padding,
                        name=conv_name)(x, defer_bias=True)
    return norm(use_running_average=not train, name=bn_name)(x, conv_bias, mask=mask, relu=relu)


class IdentityBlock(nn.Module):
    """Three convs (1x1 'valid', fxf 'same', 1x1 'valid'), each followed by BatchNorm; ReLU between
    them; the input added before the final ReLU. Input and output have the same shape.

    ``residual=False`` drops the addition: the "plain" block used to study deep nets without
    shortcuts.
    """

    filters: Sequence[int]
    kernel_size: int
    stage: int | str
    block: str
    conv: ModuleDef = layers.Conv2D
    norm: ModuleDef = layers.BatchNorm
    residual: bool = True

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool, mask: jax.Array | None = None) -> jax.Array:
        f1, f2, f3 = self.filters
        f = self.kernel_size
        conv_name, bn_name = layer_name_bases(self.stage, self.block)
        conv_bn = functools.partial(conv_batchnorm, self.conv, self.norm, train=train, mask=mask)
        shortcut = x

        x = conv_bn(x, f1, 1, conv_name + "2a", bn_name + "2a", relu=True)
        x = conv_bn(x, f2, f, conv_name + "2b", bn_name + "2b", padding="SAME", relu=True)
        x = conv_bn(x, f3, 1, conv_name + "2c", bn_name + "2c")

        if self.residual:
            x = x + shortcut
        return nn.relu(x)


class ConvolutionalBlock(nn.Module):
    """The identity block's main path with stride ``strides`` on its first 1x1 conv, and a shortcut
    of a strided 1x1 conv (F3 filters, 'valid') and BatchNorm, so input and output shapes may differ.
    """

    filters: Sequence[int]
    kernel_size: int
    stage: int | str
    block: str
    strides: int = 2
    conv: ModuleDef = layers.Conv2D
    norm: ModuleDef = layers.BatchNorm
    residual: bool = True

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool, mask: jax.Array | None = None) -> jax.Array:
        f1, f2, f3 = self.filters
        f, s = self.kernel_size, self.strides
        conv_name, bn_name = layer_name_bases(self.stage, self.block)
        conv_bn = functools.partial(conv_batchnorm, self.conv, self.norm, train=train, mask=mask)
        shortcut = x

        x = conv_bn(x, f1, 1, conv_name + "2a", bn_name + "2a", strides=s, relu=True)
        x = conv_bn(x, f2, f, conv_name + "2b", bn_name + "2b", padding="SAME", relu=True)
        x = conv_bn(x, f3, 1, conv_name + "2c", bn_name + "2c")

        if self.residual:
            shortcut = conv_bn(shortcut, f3, 1, conv_name + "1", bn_name + "1", strides=s)
            x = x + shortcut
        return nn.relu(x)


class ResNet(nn.Module):
    """The assignment's ResNet family.

    zero-pad 3 -> conv1 7x7/2 -> bn_conv1 -> ReLU -> max-pool 3x3/2 'valid' -> stages 2, 3, ...
    (each a convolutional block, stride 1 in the first stage and 2 after, then identity blocks)
    -> average pool 2x2 'valid' -> flatten -> dense ``fc{num_classes}``. Returns logits.

    Attributes:
      num_classes: size of the output layer, which is named ``fc{num_classes}``.
      stage_sizes: blocks per stage, the convolutional block included (ResNet-50: 3, 4, 6, 3).
      stage_filters: (F1, F2, F3) of each stage.
      stem_features: filters of ``conv1``.
      kernel_size: the middle window ``f`` of every block.
      conv, norm, dense: module factories of the convolution, BatchNorm and output layers
        (``layer_factories`` gives the convolutions their implementation, and them and the
        output layer their precision).
      residual: False builds the plain twin: the same layers without shortcut additions (the
        convolutional blocks' shortcut convs are dropped as well).
    """

    num_classes: int
    stage_sizes: Sequence[int] = (3, 4, 6, 3)
    stage_filters: Sequence[Sequence[int]] = (
        (64, 64, 256),
        (128, 128, 512),
        (256, 256, 1024),
        (512, 512, 2048),
    )
    stem_features: int = 64
    kernel_size: int = 3
    conv: ModuleDef = layers.Conv2D
    norm: ModuleDef = layers.BatchNorm
    dense: ModuleDef = functools.partial(nn.Dense, precision="highest")
    residual: bool = True

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool, mask: jax.Array | None = None) -> jax.Array:
        """Logits for NHWC images ``x``.

        ``mask`` (bool, one per example) leaves padding examples out of the batch statistics in
        training mode, so a padded batch of 32 holding 24 real examples normalises exactly as a
        batch of those 24 would; the examples' own outputs are unaffected by it.
        """
        if mask is not None:
            mask = mask.reshape(-1, 1, 1, 1)
        x = jnp.pad(x, ((0, 0), (3, 3), (3, 3), (0, 0)))
        x = conv_batchnorm(self.conv, self.norm, x, self.stem_features, 7, "conv1", "bn_conv1", strides=2,
                           relu=True, train=train, mask=mask)
        x = max_pool(x, (3, 3), strides=(2, 2))
        self.sow("intermediates", "stage1", x)

        for index, (num_blocks, filters) in enumerate(zip(self.stage_sizes, self.stage_filters)):
            stage = index + 2
            for b in range(num_blocks):
                letter = string.ascii_lowercase[b]
                common = dict(
                    filters=filters,
                    kernel_size=self.kernel_size,
                    stage=stage,
                    block=letter,
                    conv=self.conv,
                    norm=self.norm,
                    residual=self.residual,
                    name=f"block{stage}{letter}",
                )
                if b == 0:
                    x = ConvolutionalBlock(strides=1 if index == 0 else 2, **common)(x, train=train, mask=mask)
                else:
                    x = IdentityBlock(**common)(x, train=train, mask=mask)
            self.sow("intermediates", f"stage{stage}", x)

        x = nn.avg_pool(x, window_shape=(2, 2), strides=(2, 2), padding="VALID")
        self.sow("intermediates", "avg_pool", x)
        x = x.reshape(x.shape[0], -1)
        return self.dense(self.num_classes, kernel_init=nn.initializers.glorot_uniform(),
                          name=f"fc{self.num_classes}")(x)


ResNet50 = functools.partial(ResNet, stage_sizes=(3, 4, 6, 3))
ResNet50.__doc__ = "The assignment's ResNet-50: ``ResNet50(num_classes=6)``."

# Small members of the family, for tests and quick experiments.
MODELS: dict[str, Callable[..., ResNet]] = {
    "resnet50": ResNet50,
    "plain50": functools.partial(ResNet, stage_sizes=(3, 4, 6, 3), residual=False),
    "resnet26": functools.partial(ResNet, stage_sizes=(2, 2, 2, 2)),
    "resnet14": functools.partial(ResNet, stage_sizes=(1, 1, 1, 1)),
    "resnet_tiny": functools.partial(
        ResNet,
        stage_sizes=(1, 1),
        stage_filters=((4, 4, 8), (8, 8, 16)),
        stem_features=8,
    ),
}


def keras_layer_paths(variables: Mapping[str, Any]) -> dict[str, tuple[str, ...]]:
    """Every Keras layer name of the model, mapped to its module path inside ``variables['params']``.

    A BatchNorm layer's ``batch_stats`` sit at the same path in ``variables['batch_stats']``.
    """
    paths: dict[str, tuple[str, ...]] = {}

    def visit(tree: Mapping[str, Any], prefix: tuple[str, ...]) -> None:
        for name, child in tree.items():
            if not isinstance(child, Mapping):
                continue
            if any(not isinstance(leaf, Mapping) for leaf in child.values()):
                paths[name] = prefix + (name,)
            else:
                visit(child, prefix + (name,))

    visit(variables["params"], ())
    return paths


def layer_factories(conv_impl: str = "auto", precision: str = "highest") -> dict[str, ModuleDef]:
    """The ``conv``, ``norm`` and ``dense`` factories of a model whose convolutions run as
    ``conv_impl`` ('auto' resolved here, for the default backend) and whose products run at
    ``precision``: 'highest' (float32 products on every backend), 'high' or 'default' (the
    backend's fastest, e.g. TensorFloat-32 on GPU)."""
    if precision not in conv_ops.PRECISIONS:
        raise UserError(f"config.matmul_precision must be one of {conv_ops.PRECISIONS}, got {precision!r}")
    if conv_impl not in conv_ops.IMPLEMENTATIONS:
        raise UserError(f"config.conv_impl must be one of {conv_ops.IMPLEMENTATIONS}, got {conv_impl!r}")
    return {
        "conv": functools.partial(layers.Conv2D, impl=conv_ops.resolve_impl(conv_impl), precision=precision),
        "norm": layers.BatchNorm,
        "dense": functools.partial(nn.Dense, precision=precision),
    }


def create_model(name: str, *, num_classes: int, conv_impl: str = "auto",
                 precision: str = "highest") -> ResNet:
    """Builds one of :data:`MODELS` by name, its layers resolved by :func:`layer_factories`."""
    if name not in MODELS:
        raise UserError(f"config.model: unknown model {name!r}; expected one of {sorted(MODELS)}")
    if num_classes < 1:
        raise UserError(f"config.num_classes must be >= 1, got {num_classes}")
    return MODELS[name](num_classes=num_classes, **layer_factories(conv_impl, precision))


def model_from_config(config: Mapping[str, Any], num_classes: int | None = None) -> ResNet:
    """The model a run's config describes (a config saved before a field existed gets its default)."""
    return create_model(config["model"], num_classes=num_classes or config["num_classes"],
                        conv_impl=config.get("conv_impl", "auto"),
                        precision=config.get("matmul_precision", "highest"))
