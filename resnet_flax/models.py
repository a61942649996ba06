"""The assignment's ResNet-50 as ``flax.linen`` modules, with Keras semantics and layer names, and
the family's registry: ``create_model(name, variant=...)`` builds any depth in the assignment's,
torchvision's or the pre-activation layout (``resnet_flax.imagenet_layouts`` holds the latter two).

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

from resnet_flax import imagenet_layouts, layers
from resnet_flax.errors import UserError
from resnet_flax.ops import conv as conv_ops
from resnet_flax.ops.conv_plan import ConvPlan
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


def _main_path(conv_bn, x: jax.Array, filters: Sequence[int], f: int, strides: int,
               conv_name: str, bn_name: str) -> jax.Array:
    """A block's main path before the addition: the bottleneck (1x1 'valid' with the stride, fxf
    'same', 1x1 'valid') for three filter counts, the basic block (fxf 'same' with the stride, fxf
    'same') for two; each conv followed by BatchNorm, ReLU between them."""
    if len(filters) == 3:
        f1, f2, f3 = filters
        x = conv_bn(x, f1, 1, conv_name + "2a", bn_name + "2a", strides=strides, relu=True)
        x = conv_bn(x, f2, f, conv_name + "2b", bn_name + "2b", padding="SAME", relu=True)
        return conv_bn(x, f3, 1, conv_name + "2c", bn_name + "2c")
    if len(filters) == 2:
        f1, f2 = filters
        x = conv_bn(x, f1, f, conv_name + "2a", bn_name + "2a", strides=strides, padding="SAME", relu=True)
        return conv_bn(x, f2, f, conv_name + "2b", bn_name + "2b", padding="SAME")
    raise ValueError(f"a block takes two (basic) or three (bottleneck) filter counts, got {filters}")


def block_letter(index: int, num_blocks: int) -> str:
    """A block's name within its stage: a, b, c, ... as in the assignment; in a stage of more than
    26 blocks (ResNet-152's stage 4, 36 blocks), the original Caffe models' a, b1, b2, ..."""
    if num_blocks <= len(string.ascii_lowercase):
        return string.ascii_lowercase[index]
    return "a" if index == 0 else f"b{index}"


class IdentityBlock(nn.Module):
    """Three convs (1x1 'valid', fxf 'same', 1x1 'valid'), each followed by BatchNorm; ReLU between
    them; the input added before the final ReLU. Input and output have the same shape.

    Two filter counts (F1, F2) give the basic block of ResNet-18/34 in the assignment's style: two
    fxf 'same' convs (``res..._branch2a``, ``2b``). ``residual=False`` drops the addition: the
    "plain" block used to study deep nets without shortcuts.
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
        conv_name, bn_name = layer_name_bases(self.stage, self.block)
        conv_bn = functools.partial(conv_batchnorm, self.conv, self.norm, train=train, mask=mask)
        shortcut = x
        x = _main_path(conv_bn, x, self.filters, self.kernel_size, 1, conv_name, bn_name)
        if self.residual:
            x = x + shortcut
        return nn.relu(x)


class ConvolutionalBlock(nn.Module):
    """The identity block's main path with stride ``strides`` on its first conv (the 1x1 of a
    bottleneck), and a shortcut of a strided 1x1 conv (F3 filters, 'valid') and BatchNorm, so input
    and output shapes may differ.
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
        conv_name, bn_name = layer_name_bases(self.stage, self.block)
        conv_bn = functools.partial(conv_batchnorm, self.conv, self.norm, train=train, mask=mask)
        shortcut = x
        x = _main_path(conv_bn, x, self.filters, self.kernel_size, self.strides, conv_name, bn_name)
        if self.residual:
            shortcut = conv_bn(shortcut, self.filters[-1], 1, conv_name + "1", bn_name + "1", strides=self.strides)
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
      stage_filters: (F1, F2, F3) of each stage's bottleneck blocks, or (F1, F2) for basic blocks
        (ResNet-18/34 in the assignment's style).
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

    @property
    def head_name(self) -> str:
        """The output layer's name: what transfer learning re-initialises or trains alone."""
        return f"fc{self.num_classes}"

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
                letter = block_letter(b, num_blocks)
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
        logits = self.dense(self.num_classes, kernel_init=nn.initializers.glorot_uniform(), name=self.head_name)(x)
        return logits.astype(jnp.float32)


ResNet50 = functools.partial(ResNet, stage_sizes=(3, 4, 6, 3))
ResNet50.__doc__ = "The assignment's ResNet-50: ``ResNet50(num_classes=6)``."

BASIC_FILTERS = ((64, 64), (128, 128), (256, 256), (512, 512))
BOTTLENECK_FILTERS = ((64, 64, 256), (128, 128, 512), (256, 256, 1024), (512, 512, 2048))

# He et al. (2015), Table 1, and small members for tests and quick experiments: blocks per stage
# and each stage's filters (two for basic blocks, three for bottlenecks), and the stem's filters.
ARCHITECTURES: dict[str, dict[str, Any]] = {
    "18": dict(stage_sizes=(2, 2, 2, 2), stage_filters=BASIC_FILTERS),
    "34": dict(stage_sizes=(3, 4, 6, 3), stage_filters=BASIC_FILTERS),
    "50": dict(stage_sizes=(3, 4, 6, 3), stage_filters=BOTTLENECK_FILTERS),
    "101": dict(stage_sizes=(3, 4, 23, 3), stage_filters=BOTTLENECK_FILTERS),
    "152": dict(stage_sizes=(3, 8, 36, 3), stage_filters=BOTTLENECK_FILTERS),
    "26": dict(stage_sizes=(2, 2, 2, 2), stage_filters=BOTTLENECK_FILTERS),
    "14": dict(stage_sizes=(1, 1, 1, 1), stage_filters=BOTTLENECK_FILTERS),
    "_tiny": dict(stage_sizes=(1, 1), stage_filters=((4, 4, 8), (8, 8, 16)), stem_features=8),
}
# config.model: 'resnet<depth>' and its plain twin 'plain<depth>' (no shortcuts).
MODELS: dict[str, dict[str, Any]] = {
    **{f"resnet{depth}": dict(spec, residual=True) for depth, spec in ARCHITECTURES.items()},
    **{f"plain{depth}": dict(spec, residual=False) for depth, spec in ARCHITECTURES.items()},
}
# config.variant: the assignment's Keras layout, torchvision's, or the pre-activation one.
VARIANTS = ("assignment", "torchvision", "preact")
DTYPES = {"float32": None, "bfloat16": jnp.bfloat16}


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


def layer_factories(conv_impl: str = "auto", precision: str = "highest", variant: str = "assignment",
                    dtype: str = "float32", conv_plan: ConvPlan | None = None) -> dict[str, ModuleDef]:
    """The ``conv``, ``norm`` and ``dense`` factories of a model of ``variant``'s conventions
    (Keras's for 'assignment', PyTorch's otherwise) whose convolutions run as ``conv_impl`` ('auto'
    resolved here, for the default backend; 'xla' when computing in bfloat16, which the CPU
    kernels are not tuned for), whose products run at ``precision`` ('highest': float32 products
    on every backend; 'high' or 'default': the backend's fastest, e.g. TensorFloat-32 on GPU) and
    which compute in ``dtype`` ('float32' or 'bfloat16', parameters float32 either way).
    ``conv_plan`` (``resnet_flax.autotune``) gives measured kernels per layer shape, for 'auto'
    on CPU in float32 only; elsewhere it is ignored."""
    if precision not in conv_ops.PRECISIONS:
        raise UserError(f"config.matmul_precision must be one of {conv_ops.PRECISIONS}, got {precision!r}")
    if conv_impl not in conv_ops.IMPLEMENTATIONS:
        raise UserError(f"config.conv_impl must be one of {conv_ops.IMPLEMENTATIONS}, got {conv_impl!r}")
    if variant not in VARIANTS:
        raise UserError(f"config.variant must be one of {VARIANTS}, got {variant!r}")
    if dtype not in DTYPES:
        raise UserError(f"config.dtype must be one of {tuple(DTYPES)}, got {dtype!r}")
    compute_dtype = DTYPES[dtype]
    if compute_dtype is not None and conv_impl == "auto":
        conv_impl = "xla"
    impl = conv_ops.resolve_impl(conv_impl)
    plan = conv_plan if conv_impl == "auto" and impl == "winograd" and conv_plan else None
    conv = functools.partial(layers.Conv2D, impl=impl, plan=plan, precision=precision, dtype=compute_dtype)
    norm = functools.partial(layers.BatchNorm, dtype=compute_dtype)
    if variant != "assignment":
        conv = functools.partial(conv, use_bias=False, kernel_init=imagenet_layouts.CONV_INIT)
        norm = functools.partial(norm, momentum=imagenet_layouts.BN_MOMENTUM, epsilon=imagenet_layouts.BN_EPSILON)
    return {"conv": conv, "norm": norm, "dense": functools.partial(nn.Dense, precision=precision, dtype=compute_dtype)}


def resolved_conv_impl(config: Mapping[str, Any]) -> str:
    """The convolution implementation a config's model runs ('auto' resolved)."""
    factories = layer_factories(config.get("conv_impl", "auto"), config.get("matmul_precision", "highest"),
                                config.get("variant", "assignment"), config.get("dtype", "float32"))
    return factories["conv"].keywords["impl"]


def batchnorm_momentum(config: Mapping[str, Any]) -> float:
    """The BatchNorm momentum (flax's sense) of the model a config describes."""
    if config.get("variant", "assignment") == "assignment":
        return layers.BN_MOMENTUM
    return imagenet_layouts.BN_MOMENTUM


def create_model(name: str, *, num_classes: int, variant: str = "assignment", conv_impl: str = "auto",
                 precision: str = "highest", dtype: str = "float32", conv_plan: ConvPlan | None = None) -> nn.Module:
    """Builds one of :data:`MODELS` by name in ``variant``'s layout, its layers resolved by
    :func:`layer_factories`: a :class:`ResNet` for 'assignment', an
    ``imagenet_layouts.ImageNetResNet`` otherwise."""
    if name not in MODELS:
        raise UserError(f"config.model: unknown model {name!r}; expected one of {sorted(MODELS)}")
    if num_classes < 1:
        raise UserError(f"config.num_classes must be >= 1, got {num_classes}")
    factories = layer_factories(conv_impl, precision, variant, dtype, conv_plan)
    if variant == "assignment":
        return ResNet(num_classes=num_classes, **MODELS[name], **factories)
    return imagenet_layouts.ImageNetResNet(num_classes=num_classes, preact=variant == "preact",
                                           **MODELS[name], **factories)


def model_from_config(config: Mapping[str, Any], num_classes: int | None = None,
                      conv_plan: ConvPlan | None = None) -> nn.Module:
    """The model a run's config describes (a config saved before a field existed gets its default),
    its convolutions by ``conv_plan`` where that applies (``layer_factories``)."""
    return create_model(config["model"], num_classes=num_classes or config["num_classes"],
                        variant=config.get("variant", "assignment"),
                        conv_impl=config.get("conv_impl", "auto"),
                        precision=config.get("matmul_precision", "highest"),
                        dtype=config.get("dtype", "float32"), conv_plan=conv_plan)
