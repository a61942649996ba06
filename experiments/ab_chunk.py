"""In-process A/B of the CPU default ResNet-50 training chunk and evaluation against a variant.

This machine's speed drifts by several percent from minute to minute, more than most of the
changes tried here are worth, so comparing separate processes says little. This script builds
the current code and one variant in the same process (each compiled once, for 4-step chunks of
batch 32, from its own train state), then alternates their calls round by round (the order flips
each round) and reports best and median seconds per training step and per evaluation batch.

Each variant is built through the package's seams, never by replacing its functions: the model's
layer factories (``models.layer_factories``'s, with ``layers.Conv2D``'s ``convolve`` or
``layers.BatchNorm``'s ``normalize`` replaced by a function written here, or another layer), the
optimizer, the compiler options, or the kernels the evaluation derives up front.

The current code is the default configuration ('auto' conv: 'winograd' on CPU; the variants from
``copied-kernels`` to ``xla-conv-stages-3-4`` were measured against 'gemm', the default when they
ran). Variants (each names what it changes against the current code):

* ``im2col-3x3``: every 3x3 convolution by im2col + product (``impl='gemm'``) instead of Winograd,
  in evaluation too.
* ``winograd-f2-only``: F(2x2, 3x3) on every map of at least 4x4 pixels (no F(4x4, 3x3)).
* ``winograd-f4-at-4x4``: F(4x4, 3x3) at 4x4 pixels too (one 6x6 tile per image).
* ``winograd-f2-at-2x2``: F(2x2, 3x3) at 2x2 pixels too (ResNet-50's last stage).

  The tile variants change the tile of each 3x3 layer in training (a ``convolve`` written here)
  and in evaluation (its kernels, still derived up front, transformed for the variant's tile).

* ``copied-kernels``: the conv product as a plain ``jnp.matmul`` (the earlier version): XLA then
  copies every kernel at the start of each step (see ``conv.patches_times_kernel``).
* ``no-mask``: BatchNorm without the padding mask (every example weighted 1).
* ``minimal-update``: Adam replaced by an optimizer whose step is ``p + 0 * g[0]``, an in-place
  pass over each parameter that still waits for every gradient: what Adam itself costs.
* ``transposed-kernel-gradients``: the kernel gradients of stages 2-3 (2048 to 8192 rows, patches
  at least twice as wide as the output) as ``(d_out^T @ patches)^T`` with ``d_out^T`` materialised,
  which XLA:CPU runs as plain YNNPACK products instead of Eigen's transposed ones.
* ``space-to-depth-stem``: the 7x7/2 stem as a 4x4/1 conv on a space-to-depth input (12-float runs
  in im2col instead of 3-float ones).
* ``variadic-batchnorm-forward-sums``: BatchNorm's forward statistics (sum and sum of squares) as
  one variadic ``lax.reduce``, one read of the activation instead of two.
* ``variadic-batchnorm-sums``: the same, and the backward pass's two sums as well.
* ``no-inference-batchnorm``: in evaluation, each BatchNorm left out (the ReLU kept): what its
  affine costs there, i.e. what folding it into the kernels could at most save.
* ``xla-conv-stages-3-4``: the 3x3 convs at 4x4 to 8x8 pixels (stages 3 and 4) by XLA's
  convolution instead of im2col + product (alone about as fast at those shapes, forward only),
  in evaluation too.
* ``kernels-derived-in-loop``: evaluation without the kernels derived up front (the earlier version):
  each layer derives what it multiplies by inside the program (XLA hoists the Winograd kernel
  transforms out of the loop over batches, into its scratch buffer) and the 2x2 maps' 3x3
  convolutions use im2col.
* ``im2col-at-2x2-in-evaluation``: the inference kernels, but im2col instead of per-tap products
  (``conv.conv_taps``) for the 3x3 convolutions on the 2x2 maps.
* ``split-products``: every im2col / 1x1 product of at least 2048 rows (and its two gradient
  products) as two independent products over the halves of its rows, so that XLA:CPU, which
  runs many single products on one thread inside the step (``step_profile.py``), can run the
  halves on both cores at once.
* ``measured-kernels``: each layer's kernel as ``python -m resnet_flax.autotune`` measured it on
  this machine (``conv_impl='auto'`` with a tuning cache), for batch 32 in training and evaluation.
* ``ynn-reduce-only``, ``no-ynn``: both programs compiled with XLA:CPU's YNNPACK fusions limited to
  reductions, or none (``xla_cpu_experimental_ynn_fusion_type``; the products then run on XLA's
  own Eigen path). Evaluation alone is now compiled with ``no-ynn``'s setting
  (``runtime.evaluation_compiler_options``), so its columns compare the same programs.

``kernel-transform-sums`` and ``tile-transform-sums`` (Winograd's transforms as written-out sums)
replaced private helpers of ``resnet_flax/ops/winograd.py`` and were measured with an earlier
version of this script, kept in git history; experiments/README.md has their results.

    python experiments/ab_chunk.py --variant copied-kernels          # ~2 minutes
    python experiments/ab_chunk.py --variant no-mask --rounds 20 --out experiments/ab_chunk.md

With ``--out`` the result is appended to that Markdown file (date, machine, command).
"""

import argparse
import dataclasses
import datetime
import functools
import os
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from flax import traverse_util
from jax import lax

from resnet_flax import autotune, evaluation, layers, runtime, steps
from resnet_flax.config import default_config
from resnet_flax.ops.conv_plan import ConvPlan
from resnet_flax.ops import batchnorm, conv, taps, winograd
from step_inputs import resnet50_state_and_batch

STEPS = 4
NUM_CLASSES = 6
IMPL, PRECISION = "winograd", "highest"  # the current code's convolutions on CPU ('auto')


# ---------------------------------------------------------------------------------------------
# Convolutions: ``layers.Conv2D``'s ``convolve`` (``conv.conv2d``'s signature) or the ``conv`` factory


def conv2d_with(gemm=conv.conv_gemm, tile_size=conv.winograd_tile_size):
    """``conv.conv2d`` written out here, with its im2col convolution ``gemm`` (``conv.conv_gemm``'s
    signature) and its Winograd tile rule ``tile_size`` (``conv.winograd_tile_size``'s) replaceable."""

    def conv2d(x, kernel, strides=(1, 1), padding="VALID", impl="auto", precision="highest"):
        pads = conv.explicit_padding(x.shape[1:3], kernel.shape[:2], strides, padding)
        impl = conv.resolve_impl(impl)
        if impl == "xla":
            return conv.conv_xla(x, kernel, strides, pads, precision)
        if impl == "winograd":
            tile = tile_size(kernel.shape, strides, pads, x.shape[1:3])
            if tile is not None:
                return winograd.conv3x3_same(x, kernel, tile, precision)
        return gemm(x, kernel, strides, pads, precision)

    return conv2d


def conv_layers(convolve) -> dict:
    """The model's ``conv`` factory with ``convolve`` in place of ``conv.conv2d``."""
    return {"conv": functools.partial(layers.Conv2D, impl=IMPL, precision=PRECISION, convolve=convolve)}


def im2col_with(product):
    """``conv.conv_gemm`` written out here, with ``product(patches, kernel, precision)`` in place of
    ``conv.patches_times_kernel``."""

    def conv_gemm(x, kernel, strides, pads, precision=None):
        kh, kw, cin, cout = kernel.shape
        sh, sw = strides
        if any(p for pair in pads for p in pair):
            x = jnp.pad(x, ((0, 0), pads[0], pads[1], (0, 0)))
        n, h, w, _ = x.shape
        ho, wo = taps.output_size(h, kh, sh), taps.output_size(w, kw, sw)

        def shifted(i, j):
            return taps.window_tap(x, (i, j), (ho, wo), (sh, sw))

        if kh * kw == 1:
            patches = shifted(0, 0)
        else:
            rows = [jnp.stack([shifted(i, j) for j in range(kw)], axis=3) for i in range(kh)]
            patches = jnp.stack(rows, axis=3)  # (n, ho, wo, kh, kw, cin)
        y = product(patches.reshape(n * ho * wo, kh * kw * cin), kernel.reshape(kh * kw * cin, cout), precision)
        return y.reshape(n, ho, wo, cout)

    return conv_gemm


def plain_product(patches, kernel, precision):
    return jnp.matmul(patches, kernel, precision=precision)


def product_with_kernel_gradient(kernel_gradient):
    """``conv.patches_times_kernel`` written out here, with ``kernel_gradient(patches, d_out,
    precision)`` in place of ``conv.kernel_gradient``."""

    @functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
    def product(patches, kernel, precision):
        return jnp.matmul(patches, kernel, precision=precision)

    def forward(patches, kernel, precision):
        kept_kernel = kernel.value if patches.perturbed else None
        return product(patches.value, kernel.value, precision), (patches.value, kept_kernel)

    def backward(precision, residuals, d_out):
        patches, kernel = residuals
        d_kernel = kernel_gradient(patches, d_out, precision)
        if kernel is None:
            return None, d_kernel
        d_patches = jnp.matmul(d_out, kernel.T, precision=precision)
        return d_patches, d_kernel + 0.0 * d_patches[0, 0]

    product.defvjp(forward, backward, symbolic_zeros=True)
    return product


SPLIT_ROWS = 2048  # products with fewer rows stay whole


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def split_product(patches, kernel, precision):
    """``patches @ kernel`` as two products over the halves of the rows, the gradients likewise
    (the kernel's as the sum of the halves' products)."""
    if patches.shape[0] < SPLIT_ROWS:
        return jnp.matmul(patches, kernel, precision=precision)
    half = patches.shape[0] // 2
    return jnp.concatenate([jnp.matmul(patches[:half], kernel, precision=precision),
                            jnp.matmul(patches[half:], kernel, precision=precision)])


def _split_product_fwd(patches, kernel, precision):
    kept_kernel = kernel.value if patches.perturbed else None
    return split_product(patches.value, kernel.value, precision), (patches.value, kept_kernel)


def _split_product_bwd(precision, residuals, d_out):
    patches, kernel = residuals
    if patches.shape[0] < SPLIT_ROWS:
        return conv._patches_times_kernel_bwd(precision, residuals, d_out)
    half = patches.shape[0] // 2
    d_kernel = (conv.kernel_gradient(patches[:half], d_out[:half], precision)
                + conv.kernel_gradient(patches[half:], d_out[half:], precision))
    if kernel is None:
        return None, d_kernel
    d_patches = jnp.concatenate([jnp.matmul(d_out[:half], kernel.T, precision=precision),
                                 jnp.matmul(d_out[half:], kernel.T, precision=precision)])
    return d_patches, d_kernel + 0.0 * d_patches[0, 0]


split_product.defvjp(_split_product_fwd, _split_product_bwd, symbolic_zeros=True)


def transposed_kernel_gradient(original):
    """``conv.kernel_gradient`` that, for stages 2-3, multiplies a materialised ``d_out^T`` by the
    patches (a plain product) and transposes the small result."""

    def kernel_gradient(patches, d_out, precision):
        rows, width = patches.shape
        if not (2048 <= rows <= 8192 and width >= 2 * d_out.shape[1]):
            return original(patches, d_out, precision)
        # The barriers keep XLA from folding the transposes back into one Eigen product.
        d_out_t = lax.optimization_barrier(d_out.T)
        return lax.optimization_barrier(jnp.matmul(d_out_t, patches, precision=precision)).T

    return kernel_gradient


def space_to_depth_gemm(original):
    """``conv.conv_gemm`` that computes a stride-2 conv on a narrow input (the stem) as a stride-1
    conv on its 2x2 space-to-depth rearrangement, the kernel zero-padded to even size."""

    def conv_gemm(x, kernel, strides, pads, precision=None):
        kh, kw, cin, cout = kernel.shape
        if tuple(strides) != (2, 2) or cin > 4 or kh == 1:
            return original(x, kernel, strides, pads, precision)
        x = jnp.pad(x, ((0, 0), pads[0], pads[1], (0, 0)))
        n, h, w, _ = x.shape
        ho, wo = (h - kh) // 2 + 1, (w - kw) // 2 + 1
        k2h, k2w = (kh + 1) // 2, (kw + 1) // 2
        he, we = 2 * (ho - 1 + k2h), 2 * (wo - 1 + k2w)
        x = jnp.pad(x, ((0, 0), (0, max(he - h, 0)), (0, max(we - w, 0)), (0, 0)))[:, :he, :we]
        x = x.reshape(n, he // 2, 2, we // 2, 2, cin).transpose(0, 1, 3, 2, 4, 5)
        x = x.reshape(n, he // 2, we // 2, 4 * cin)
        kernel = jnp.pad(kernel, ((0, 2 * k2h - kh), (0, 2 * k2w - kw), (0, 0), (0, 0)))
        kernel = kernel.reshape(k2h, 2, k2w, 2, cin, cout).transpose(0, 2, 1, 3, 4, 5)
        kernel = kernel.reshape(k2h, k2w, 4 * cin, cout)
        return original(x, kernel, (1, 1), ((0, 0), (0, 0)), precision)

    return conv_gemm


def retiled_tile_size(changes: dict):
    """``conv.winograd_tile_size`` with the tiles in ``changes`` replaced: ``{current: variant}``,
    where current is the tile the current code picks (4, 2, or None for a 3x3 stride-1 'same'
    convolution on a map under 4x4 pixels, which keeps im2col in training)."""

    def tile_size(kernel_shape, strides, pads, spatial):
        if conv.winograd_tile_size(kernel_shape, strides, pads, (8, 8)) is None:  # not a 3x3 'same' stride 1
            return None
        tile = conv.winograd_tile_size(kernel_shape, strides, pads, spatial)
        return changes.get(tile, tile)

    return tile_size


def xla_conv_at_stages_3_4(features, kernel_size, **kwargs):
    """The model's ``conv`` factory, with XLA's convolution (``impl='xla'``, so in evaluation too)
    for the 3x3 layers of stages 3 and 4 (``res3*``, ``res4*``: the 8x8 and 4x4 maps of a 64x64
    image); the current code's elsewhere."""
    stages_3_4 = tuple(kernel_size) == (3, 3) and kwargs.get("name", "").startswith(("res3", "res4"))
    return layers.Conv2D(features, kernel_size, impl="xla" if stages_3_4 else IMPL, precision=PRECISION,
                         **kwargs)


# ---------------------------------------------------------------------------------------------
# BatchNorm: ``layers.BatchNorm``'s ``normalize`` (``batchnorm.normalize_batch``'s signature) or the
# ``norm`` factory


def without_mask(x, input_bias, scale, bias, weight, epsilon, relu):
    """``batchnorm.normalize_batch`` with every example weighted 1 (the padding counted in)."""
    return batchnorm.normalize_batch(x, input_bias, scale, bias, jnp.ones_like(weight), epsilon, relu)


def plain_sums(a, b, axes):
    return jnp.sum(a, axis=axes), jnp.sum(b, axis=axes)


def variadic_sums(a, b, axes):
    """``(sum a, sum b)`` over ``axes`` as one variadic reduction (one read of both)."""
    zero = jnp.zeros((), a.dtype)
    return lax.reduce((a, b), (zero, zero), lambda s, t: (s[0] + t[0], s[1] + t[1]), axes)


def normalize_batch_with(forward_sums=plain_sums, backward_sums=plain_sums):
    """``batchnorm.normalize_batch`` written out here (as ``resnet_flax/ops/batchnorm.py`` computes
    it), with its two sums per pass replaceable: ``forward_sums(x, x * x, (1, 2))`` for the
    statistics, ``backward_sums(d_out, d_out * x_hat, (0, 1, 2))`` for the gradient."""

    def statistics(x, weight):
        height, width = x.shape[1:3]
        count = jnp.maximum(jnp.sum(weight) * (height * width), 1.0)
        sums, sums_of_squares = forward_sums(x, x * x, (1, 2))
        mean = jnp.sum(sums * weight[:, None], axis=0) / count
        mean_of_squares = jnp.sum(sums_of_squares * weight[:, None], axis=0) / count
        raw_var = mean_of_squares - mean * mean
        return mean, jnp.maximum(0.0, raw_var), raw_var, count

    def forward(x, input_bias, scale, bias, weight, epsilon, relu):
        mean, var, raw_var, count = statistics(x, weight)
        out = (x - mean) * (lax.rsqrt(var + epsilon) * scale) + bias
        if relu:
            out = jnp.maximum(out, 0.0)
        gate = out if relu else None
        return (out, mean + input_bias, var), (x, gate, scale, weight, mean, var, raw_var, count)

    def backward(epsilon, relu, residuals, cotangents):
        x, gate, scale, weight, mean, var, raw_var, count = residuals
        d_out, d_mean, d_var = cotangents
        inv_sigma = lax.rsqrt(var + epsilon)
        x_hat = x * inv_sigma - mean * inv_sigma
        if relu:
            d_out = jnp.where(gate > 0, d_out, 0.0)
        sum_d_out, sum_d_out_x_hat = backward_sums(d_out, d_out * x_hat, (0, 1, 2))
        var_gate = jnp.where(raw_var > 0, 1.0, jnp.where(raw_var == 0, 0.5, 0.0))
        d_var_total = var_gate * (d_var - 0.5 * scale * inv_sigma * inv_sigma * sum_d_out_x_hat)
        d_mean_total = d_mean - scale * inv_sigma * sum_d_out
        counted = weight[:, None, None, None] / count
        d_x = scale * inv_sigma * d_out + counted * (d_mean_total + 2.0 * d_var_total * (x - mean))
        return d_x, d_mean, sum_d_out_x_hat, sum_d_out, jnp.zeros_like(weight)

    @functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6))
    def normalize_batch(x, input_bias, scale, bias, weight, epsilon, relu):
        return forward(x, input_bias, scale, bias, weight, epsilon, relu)[0]

    normalize_batch.defvjp(forward, backward)
    return normalize_batch


def norm_layers(normalize) -> dict:
    """The model's ``norm`` factory with ``normalize`` in place of ``batchnorm.normalize_batch``."""
    return {"norm": functools.partial(layers.BatchNorm, normalize=normalize)}


class NoInferenceBatchNorm(layers.BatchNorm):
    """``layers.BatchNorm`` in training; in evaluation only its ReLU."""

    def __call__(self, x, input_bias=None, *, mask=None, relu=False):
        if not self.use_running_average or self.is_initializing():  # init creates the variables
            return super().__call__(x, input_bias, mask=mask, relu=relu)
        return jnp.maximum(x, 0.0) if relu else x


# ---------------------------------------------------------------------------------------------
# The optimizer


def minimal_update() -> optax.GradientTransformation:
    """Updates of ``0 * g[0]`` (one entry of each parameter's gradient): the step ``p + 0 * g[0]``."""

    def update(grads, state, params=None):
        del params
        return jax.tree.map(lambda g: jnp.broadcast_to(0.0 * g[(0,) * g.ndim], g.shape), grads), state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


# ---------------------------------------------------------------------------------------------
# Evaluation: the kernels it derives up front (``evaluation.inference_kernels``'s signature)


def no_inference_kernels(apply_fn, variables, images):
    """None derived up front: each layer derives what it multiplies by inside the loop."""
    return {}


def mapped_inference_kernels(change):
    """``evaluation.inference_kernels`` with each layer's derived kernel replaced by
    ``change(kernel, derived)``; where that is None the layer has none (and convolves as in
    training)."""

    def inference_kernels(apply_fn, variables, images):
        derived = evaluation.inference_kernels(apply_fn, variables, images)
        kernels = traverse_util.flatten_dict(variables["params"])
        changed = {}
        for path, form in traverse_util.flatten_dict(derived.get(conv.INFERENCE_KERNELS, {})).items():
            new = change(kernels[path], form)
            if new is not None:
                changed[path] = new
        return {conv.INFERENCE_KERNELS: traverse_util.unflatten_dict(changed)} if changed else {}

    return inference_kernels


def retiled_kernel(changes: dict):
    """For ``mapped_inference_kernels``: the Winograd kernel for the variant's tile (``changes`` as in
    ``retiled_tile_size``; the per-tap kernels of the maps under 4x4 count as tile None)."""

    def change(kernel, derived):
        tile = None if isinstance(derived, tuple) else derived.shape[0] - 2
        return winograd.kernel_tiles(kernel, changes[tile]) if tile in changes else derived

    return change


def winograd_kernels_only(kernel, derived):
    """For ``mapped_inference_kernels``: no per-tap kernels (those layers keep im2col)."""
    return None if isinstance(derived, tuple) else derived


def evaluation_program(apply_fn, inference_kernels=None):
    """``evaluation.evaluation_program``; with ``inference_kernels``, the same program
    (``evaluation.evaluate_batches`` written out here) with its kernels derived by that."""
    if inference_kernels is None:
        return evaluation.evaluation_program(apply_fn, NUM_CLASSES)
    step = functools.partial(steps.eval_step, apply_fn, num_classes=NUM_CLASSES)

    def evaluate(variables, batches):
        kernels = inference_kernels(apply_fn, variables, batches["image"][0])
        sums = steps.scan_batches(lambda v, b: (v, step(v, b)), {**variables, **kernels}, batches)[1]
        return sums, kernels

    return jax.jit(evaluate, compiler_options=runtime.evaluation_compiler_options())


# ---------------------------------------------------------------------------------------------
# The variants


@dataclasses.dataclass(frozen=True)
class Variant:
    """What a variant changes; the defaults are the current code."""

    # Layer factories ('conv', 'norm', 'dense') in place of models.layer_factories' own.
    factories: dict[str, Callable[..., nn.Module]] = dataclasses.field(default_factory=dict)
    optimizer: optax.GradientTransformation | None = None  # in place of the config's Adam
    compiler_options: dict | None = None  # for both programs
    inference_kernels: Callable | None = None  # in place of evaluation.inference_kernels
    # The 'conv' factory of evaluation's model, where it differs from training's.
    eval_conv: Callable[..., nn.Module] | None = None


CURRENT_CODE = Variant()
VARIANTS = {
    "im2col-3x3": Variant(factories={"conv": functools.partial(layers.Conv2D, impl="gemm", precision=PRECISION)}),
    "winograd-f2-only": Variant(factories=conv_layers(conv2d_with(tile_size=retiled_tile_size({4: 2}))),
                                inference_kernels=mapped_inference_kernels(retiled_kernel({4: 2}))),
    "winograd-f4-at-4x4": Variant(factories=conv_layers(conv2d_with(tile_size=retiled_tile_size({2: 4}))),
                                  inference_kernels=mapped_inference_kernels(retiled_kernel({2: 4}))),
    "winograd-f2-at-2x2": Variant(factories=conv_layers(conv2d_with(tile_size=retiled_tile_size({None: 2}))),
                                  inference_kernels=mapped_inference_kernels(retiled_kernel({None: 2}))),
    "copied-kernels": Variant(factories=conv_layers(conv2d_with(gemm=im2col_with(plain_product)))),
    "no-mask": Variant(factories=norm_layers(without_mask)),
    "minimal-update": Variant(optimizer=minimal_update()),
    "transposed-kernel-gradients": Variant(factories=conv_layers(conv2d_with(gemm=im2col_with(
        product_with_kernel_gradient(transposed_kernel_gradient(conv.kernel_gradient)))))),
    "space-to-depth-stem": Variant(factories=conv_layers(conv2d_with(gemm=space_to_depth_gemm(conv.conv_gemm)))),
    "variadic-batchnorm-forward-sums": Variant(factories=norm_layers(normalize_batch_with(forward_sums=variadic_sums))),
    "variadic-batchnorm-sums": Variant(factories=norm_layers(normalize_batch_with(variadic_sums, variadic_sums))),
    "no-inference-batchnorm": Variant(factories={"norm": NoInferenceBatchNorm}),
    "xla-conv-stages-3-4": Variant(factories={"conv": xla_conv_at_stages_3_4}),
    "kernels-derived-in-loop": Variant(inference_kernels=no_inference_kernels),
    "im2col-at-2x2-in-evaluation": Variant(inference_kernels=mapped_inference_kernels(winograd_kernels_only)),
    "ynn-reduce-only": Variant(compiler_options={"xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_REDUCE"}),
    "no-ynn": Variant(compiler_options={"xla_cpu_experimental_ynn_fusion_type": ""}),
    "split-products": Variant(factories=conv_layers(conv2d_with(gemm=im2col_with(split_product)))),
    "measured-kernels": lambda: measured_kernels(),  # built when asked for: it measures first
}


def measured_kernels() -> Variant:
    """The kernels ``python -m resnet_flax.autotune`` measures for this script's shapes (batch 32 in
    training and evaluation), from this machine's cache (measured first where it lacks them)."""
    config = default_config()
    config.eval_batch_size = 32
    choices = autotune.tune(config)
    plan = ConvPlan.from_mapping({key: entry["kernel"] for key, entry in choices.items()})

    def conv_factory(mode):
        return functools.partial(layers.Conv2D, impl=IMPL, plan=plan.in_mode(mode), precision=PRECISION)
    return Variant(factories={"conv": conv_factory("train")}, eval_conv=conv_factory("eval"))


def build(variant: Variant):
    """Compiled 4-step chunk and evaluation for ``variant``, their state and inputs."""
    step = functools.partial(steps.train_step, num_classes=NUM_CLASSES)

    def chunk(state, batches):
        def one(i, state):
            batch = jax.tree.map(lambda a: lax.dynamic_index_in_dim(a, i, keepdims=False), batches)
            return step(state, batch, jax.random.key(0))[0]
        return lax.fori_loop(0, STEPS, one, state)

    model, state, batch = resnet50_state_and_batch("auto", **variant.factories)
    if variant.optimizer is not None:
        state = state.replace(tx=variant.optimizer, opt_state=variant.optimizer.init(state.params))
    batches = jax.tree.map(lambda a: jnp.stack([a] * STEPS), batch)
    options = variant.compiler_options
    start = time.perf_counter()
    train_chunk = jax.jit(chunk, donate_argnums=0).lower(state, batches).compile(options)
    chunk_compile_s = time.perf_counter() - start
    variables = {"params": state.params, "batch_stats": state.batch_stats}
    eval_model = model.clone(conv=variant.eval_conv) if variant.eval_conv else model
    start = time.perf_counter()
    evaluate = evaluation_program(eval_model.apply, variant.inference_kernels).lower(variables, batches).compile(options)
    eval_compile_s = time.perf_counter() - start
    state = train_chunk(state, batches)  # warm-up (the old state's buffers are donated)
    jax.block_until_ready(evaluate({"params": state.params, "batch_stats": state.batch_stats}, batches))
    return {"chunk": train_chunk, "evaluate": evaluate, "state": state, "batches": batches,
            "compile_s": (chunk_compile_s, eval_compile_s)}


def cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.machine()


def best_and_median(times: list[float]) -> tuple[float, float]:
    ordered = sorted(times)
    return ordered[0], ordered[len(ordered) // 2]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variant", choices=VARIANTS, required=True)
    parser.add_argument("--rounds", type=int, default=12)
    parser.add_argument("--out", help="append the result to this Markdown file")
    args = parser.parse_args()

    started = datetime.datetime.now(datetime.timezone.utc)
    variant = VARIANTS[args.variant]
    variant = variant() if callable(variant) else variant
    runs = {"current code": build(CURRENT_CODE), args.variant: build(variant)}
    train_s = {name: [] for name in runs}
    eval_s = {name: [] for name in runs}
    for round_index in range(args.rounds):
        order = list(runs) if round_index % 2 == 0 else list(reversed(runs))
        for name in order:
            run = runs[name]
            start = time.perf_counter()
            run["state"] = run["chunk"](run["state"], run["batches"])
            jax.block_until_ready(run["state"])
            train_s[name].append((time.perf_counter() - start) / STEPS)
            variables = {"params": run["state"].params, "batch_stats": run["state"].batch_stats}
            start = time.perf_counter()
            jax.block_until_ready(run["evaluate"](variables, run["batches"]))
            eval_s[name].append((time.perf_counter() - start) / STEPS)

    lines = [f"## `{args.variant}`", "",
             f"`python experiments/ab_chunk.py --variant {args.variant} --rounds {args.rounds}`, "
             f"{started:%Y-%m-%d %H:%M} UTC, {len(os.sched_getaffinity(0))} cores "
             f"({cpu_name()}), jax {jax.__version__}; load average after "
             f"{' '.join(Path('/proc/loadavg').read_text().split()[:3])}.", "",
             "| code | train step ms (best / median) | eval batch of 32 ms (best / median) "
             "| trace + compile s (chunk / eval) |", "|---|---|---|---|"]
    for name in runs:
        (tb, tm), (eb, em) = best_and_median(train_s[name]), best_and_median(eval_s[name])
        cc, ec = runs[name]["compile_s"]
        lines.append(f"| {name} | {tb * 1e3:.1f} / {tm * 1e3:.1f} | {eb * 1e3:.1f} / {em * 1e3:.1f} "
                     f"| {cc:.1f} / {ec:.1f} |")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        with open(args.out, "a") as f:
            f.write("\n" + text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
