"""In-process A/B of the CPU default ResNet-50 training chunk and evaluation against a variant (issue 5).

This machine's speed drifts by several percent from minute to minute, more than most of the
changes tried in issue 5 are worth, so comparing separate processes says little. This script builds
the current code and one variant in the same process (each compiled once, for 4-step chunks of
batch 32, from its own train state), then alternates their calls round by round (the order flips
each round) and reports best and median seconds per training step and per evaluation batch.

The current code is the default configuration ('auto' conv: 'winograd' on CPU since session 7;
the variants before ``im2col-3x3`` were measured against 'gemm', the default then). Variants (each
names what it changes against the current code):

* ``im2col-3x3``: every 3x3 convolution by im2col + product ('gemm', the default before session 7)
  instead of Winograd.
* ``kernel-transform-sums``: Winograd's kernel transforms ``G g G^T`` written out as sums of
  taps (fused elementwise loops) instead of one product with ``kron(G, G)``.
* ``tile-transform-sums``: Winograd's input and output tile transforms as sums of strided slices
  (rows first, then columns; the code before session 8) instead of one product with the
  Kronecker matrix over the gathered tile pixels.
* ``winograd-f2-only``: F(2x2, 3x3) on every map of at least 4x4 pixels (no F(4x4, 3x3)).
* ``winograd-f4-at-4x4``: F(4x4, 3x3) at 4x4 pixels too (one 6x6 tile per image).
* ``winograd-f2-at-2x2``: F(2x2, 3x3) at 2x2 pixels too (ResNet-50's last stage).

* ``copied-kernels``: the conv product as a plain ``jnp.matmul``, as before session 6: XLA then
  copies every kernel at the start of each step (see ``conv.patches_times_kernel``).
* ``no-mask``: BatchNorm without the padding mask.
* ``minimal-update``: Adam replaced by ``p + 0 * g[0]``, an in-place pass over each parameter that
  still waits for every gradient: what Adam itself costs.
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
* ``xla-conv-stages-3-4``: the 3x3 convs at 4x4 to 8x8 pixels by XLA's convolution instead of
  im2col + product (alone about as fast at those shapes, forward only).
* ``kernels-derived-in-loop``: evaluation without ``train.inference_kernels`` (before session 9):
  each layer derives what it multiplies by inside the program (XLA hoists the Winograd kernel
  transforms out of the loop over batches, into its scratch buffer) and the 2x2 maps' 3x3
  convolutions use im2col.
* ``im2col-at-2x2-in-evaluation``: the inference kernels, but im2col instead of per-tap products
  (``conv.conv_taps``) for the 3x3 convolutions on the 2x2 maps.
* ``ynn-reduce-only``, ``no-ynn``: both programs compiled with XLA:CPU's YNNPACK fusions limited to
  reductions, or none (``xla_cpu_experimental_ynn_fusion_type``; the products then run on XLA's
  own Eigen path). Evaluation alone has been compiled with ``no-ynn``'s setting since session 8
  (``runtime.evaluation_compiler_options``), so its columns now compare the same programs.

    python experiments/ab_chunk.py --variant copied-kernels          # ~2 minutes
    python experiments/ab_chunk.py --variant no-mask --rounds 20 --out experiments/ab_chunk.md

With ``--out`` the result is appended to that Markdown file (date, machine, command).
"""

import argparse
import contextlib
import datetime
import functools
import os
import platform
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from resnet_flax import batchnorm, conv, input_pipeline, train, winograd
from step_inputs import resnet50_state_and_batch

STEPS = 4
VARIANTS = ("im2col-3x3", "kernel-transform-sums", "tile-transform-sums", "winograd-f2-only", "winograd-f4-at-4x4", "winograd-f2-at-2x2",
            "copied-kernels", "no-mask", "minimal-update", "transposed-kernel-gradients",
            "space-to-depth-stem", "variadic-batchnorm-forward-sums", "variadic-batchnorm-sums",
            "no-inference-batchnorm", "xla-conv-stages-3-4", "kernels-derived-in-loop",
            "im2col-at-2x2-in-evaluation", "ynn-reduce-only", "no-ynn")

# Variants that change how XLA compiles the same programs (per-program compiler options).
COMPILER_OPTIONS = {
    "ynn-reduce-only": {"xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_REDUCE"},
    "no-ynn": {"xla_cpu_experimental_ynn_fusion_type": ""},
}


def plain_product(patches, kernel, precision):
    return jnp.matmul(patches, kernel, precision=precision)


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


def variadic_two_sums(original, axes_to_change=None):
    """``batchnorm._two_sums`` as one variadic reduction (for every call, or only for the reduction
    over ``axes_to_change``)."""

    def two_sums(a, b, axes):
        if axes_to_change is not None and tuple(axes) != axes_to_change:
            return original(a, b, axes)
        zero = jnp.zeros((), a.dtype)
        return lax.reduce((a, b), (zero, zero), lambda s, t: (s[0] + t[0], s[1] + t[1]), axes)

    return two_sums


class NoInferenceBatchNorm(batchnorm.BatchNorm):
    def __call__(self, x, input_bias=None, *, mask=None, relu=False):
        if not self.use_running_average or self.is_initializing():  # init creates the variables
            return super().__call__(x, input_bias, mask=mask, relu=relu)
        return jnp.maximum(x, 0.0) if relu else x


def xla_conv_at_stages_3_4(original):
    def conv2d(x, kernel, strides=(1, 1), padding="VALID", impl="auto", precision="highest"):
        if kernel.shape[:2] == (3, 3) and 4 <= x.shape[1] <= 8:
            impl = "xla"
        return original(x, kernel, strides, padding, impl, precision)
    return conv2d


def combine(matrix, arrays):
    """``matrix @ arrays`` for a small constant matrix and a list of equally shaped arrays, written
    as sums that skip the zero coefficients (XLA fuses them with the slices that make the arrays)."""
    rows = []
    for coefficients in matrix:
        terms = [a if c == 1 else -a if c == -1 else np.float32(c) * a
                 for c, a in zip(coefficients, arrays) if c != 0]
        rows.append(functools.reduce(jnp.add, terms))
    return rows


def kernel_transform_as_sums(kernel, matrix):
    """``winograd._kernel_transform`` as sums: ``matrix`` applied along one spatial axis, then the
    other."""
    rows = combine(matrix, list(kernel))
    return jnp.stack([jnp.stack(combine(matrix, list(row))) for row in rows])


def transform_tiles_as_sums(x, matrix, step):
    """``winograd._transform_tiles`` as sums (before session 8): along the rows on strided row
    slices, then along the columns of each result."""
    window = matrix.shape[1]
    tiles_h, tiles_w = (x.shape[1] - window) // step + 1, (x.shape[2] - window) // step + 1
    rows = combine(matrix, [winograd._strided(x, 1, i, tiles_h, step) for i in range(window)])
    return jnp.stack([jnp.stack(combine(matrix, [winograd._strided(row, 2, j, tiles_w, step) for j in range(window)]))
                      for row in rows])


def untile_as_sums(products, output_matrix):
    """``winograd._untile`` as sums (before session 8)."""
    rows = combine(output_matrix, list(products))  # along the tile's rows: m of (t, N, th, tw, C)
    pixels = [combine(output_matrix, list(row)) for row in rows]  # pixels[i][j]: (N, th, tw, C)
    tiles = jnp.stack([jnp.stack(row, axis=3) for row in pixels], axis=2)  # (N, th, m, tw, m, C)
    n, tiles_h, size, tiles_w, _, c = tiles.shape
    return tiles.reshape(n, tiles_h * size, tiles_w * size, c)


def winograd_tiles(rule):
    """``conv.winograd_tile_size`` with the tile for a map's smaller side given by ``rule``."""
    original = conv.winograd_tile_size

    def winograd_tile_size(kernel_shape, strides, pads, spatial):
        if original(kernel_shape, strides, pads, (15, 15)) is None:  # not a 3x3 'same' stride 1
            return None
        return rule(min(spatial))
    return winograd_tile_size


def winograd_tiles_only(original):
    """``conv.inference_kernel`` without the per-tap kernels (those layers keep im2col)."""
    def inference_kernel(kernel, spatial, strides, pads, impl):
        derived = original(kernel, spatial, strides, pads, impl)
        return None if isinstance(derived, tuple) else derived
    return inference_kernel


def replacements(variant: str | None) -> list[tuple[object, str, object]]:
    """``(module, attribute, replacement)`` for what ``variant`` changes in the package."""
    table = {
        "kernel-transform-sums": [(winograd, "_kernel_transform", kernel_transform_as_sums)],
        "tile-transform-sums": [(winograd, "_transform_tiles", transform_tiles_as_sums),
                                (winograd, "_untile", untile_as_sums)],
        "im2col-3x3": [(conv, "winograd_tile_size", winograd_tiles(lambda side: None))],
        "winograd-f2-only": [(conv, "winograd_tile_size", winograd_tiles(lambda side: 2 if side >= 4 else None))],
        "winograd-f4-at-4x4": [(conv, "winograd_tile_size", winograd_tiles(lambda side: 4 if side >= 4 else None))],
        "winograd-f2-at-2x2": [(conv, "winograd_tile_size",
                                winograd_tiles(lambda side: 4 if side >= 8 else 2 if side >= 2 else None))],
        "copied-kernels": [(conv, "patches_times_kernel", plain_product)],
        "transposed-kernel-gradients": [
            (conv, "kernel_gradient", transposed_kernel_gradient(conv.kernel_gradient))],
        "space-to-depth-stem": [(conv, "conv_gemm", space_to_depth_gemm(conv.conv_gemm))],
        "xla-conv-stages-3-4": [(conv, "conv2d", xla_conv_at_stages_3_4(conv.conv2d))],
        "variadic-batchnorm-forward-sums": [
            (batchnorm, "_two_sums", variadic_two_sums(batchnorm._two_sums, axes_to_change=(1, 2)))],
        "variadic-batchnorm-sums": [(batchnorm, "_two_sums", variadic_two_sums(batchnorm._two_sums))],
        "no-inference-batchnorm": [(batchnorm, "BatchNorm", NoInferenceBatchNorm)],
        "kernels-derived-in-loop": [(train, "inference_kernels", lambda apply_fn, variables, images: {})],
        "im2col-at-2x2-in-evaluation": [(conv, "inference_kernel", winograd_tiles_only(conv.inference_kernel))],
    }
    return table.get(variant, [])


@contextlib.contextmanager
def patched(variant: str | None):
    """The package as ``variant`` has it, while the variant is traced and compiled (the functions
    replaced are looked up when the model is traced)."""
    changes = replacements(variant)
    saved = [(module, name, getattr(module, name)) for module, name, _ in changes]
    for module, name, replacement in changes:
        setattr(module, name, replacement)
    try:
        yield
    finally:
        for module, name, original in saved:
            setattr(module, name, original)


def make_step(variant: str | None):
    """``train.train_step`` for the current code; for the step variants, the same computation
    written out here with its one change."""
    if variant not in ("no-mask", "minimal-update"):
        return functools.partial(train.train_step, num_classes=6)

    def step(state, batch, rng):
        del rng
        images = input_pipeline.normalize(batch["image"])
        labels, mask = batch["label"], batch["mask"]

        def loss_fn(params):
            logits, updates = state.apply_fn(
                {"params": params, "batch_stats": state.batch_stats}, images, train=True,
                mask=None if variant == "no-mask" else mask, mutable=["batch_stats"])
            per_example = train.cross_entropy(logits, labels, 6)
            return jnp.sum(per_example * mask) / jnp.maximum(jnp.sum(mask), 1), updates["batch_stats"]

        grads, batch_stats = jax.grad(loss_fn, has_aux=True)(state.params)
        if variant == "minimal-update":
            params = jax.tree.map(lambda p, g: p + 0.0 * g[(0,) * g.ndim], state.params, grads)
            return state.replace(params=params, batch_stats=batch_stats), {}
        return state.apply_gradients(grads=grads, batch_stats=batch_stats), {}

    return step


def build(variant: str | None):
    """Compiled 4-step chunk and evaluation for ``variant`` (None: the current code), their state
    and inputs."""
    step = make_step(variant)

    def chunk(state, batches):
        def one(i, state):
            batch = jax.tree.map(lambda a: lax.dynamic_index_in_dim(a, i, keepdims=False), batches)
            return step(state, batch, jax.random.key(0))[0]
        return lax.fori_loop(0, STEPS, one, state)

    with patched(variant):
        model, state, batch = resnet50_state_and_batch("auto")
        batches = jax.tree.map(lambda a: jnp.stack([a] * STEPS), batch)
        options = COMPILER_OPTIONS.get(variant)
        start = time.perf_counter()
        train_chunk = jax.jit(chunk, donate_argnums=0).lower(state, batches).compile(options)
        chunk_compile_s = time.perf_counter() - start
        variables = {"params": state.params, "batch_stats": state.batch_stats}
        start = time.perf_counter()
        evaluate = train.evaluation_program(model.apply, 6).lower(variables, batches).compile(options)
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
    runs = {"current code": build(None), args.variant: build(args.variant)}
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
