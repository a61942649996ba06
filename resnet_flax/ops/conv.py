"""2-D convolution with Keras semantics, computed by XLA's convolution or by matrix products.

Every implementation takes the same parameters (kernel in HWIO layout, bias), so a checkpoint or
Keras weights work with any of them:

* ``'xla'``  -- ``lax.conv_general_dilated``; the right choice on GPU/TPU.
* ``'gemm'`` -- the convolution lowered to one matrix product: a 1x1 convolution is a matmul over
  the N*H*W pixels, a kxk one a matmul over the k*k shifted (strided) slices side by side
  (im2col). XLA's CPU backend runs large matmuls far faster than convolutions.
* ``'winograd'`` -- 'gemm', except for 3x3 stride-1 'same' convolutions on maps of at least 4x4
  pixels, which use Winograd's minimal filtering (``ops.winograd``): F(4x4, 3x3), 4x fewer
  multiplications, from 8x8 pixels up; F(2x2, 3x3), 2.25x fewer, below. Its error is about ten
  times the direct sum's where F(4x4, 3x3) runs (a few 1e-6 of the output's scale).
* ``'auto'`` -- on CPU the kernel measured fastest for each layer's shape on this machine, where
  ``resnet_flax.autotune`` has measured it (a ``ConvPlan``), else 'winograd'; 'xla' elsewhere.

Per layer, the choice is one of :data:`KERNELS`: 'xla', 'gemm', 'winograd2' / 'winograd4'
(F(2x2, 3x3) / F(4x4, 3x3)) or 'taps' (one product per kernel tap, ``conv_taps``); the last three
exist for 3x3 stride-1 'same' convolutions only (:func:`kernel_candidates`). 'winograd' is the
static rule that maps a shape to one of them (:func:`static_kernel`).

Evaluation with 'winograd' multiplies by kernels derived once per call (``inference_kernel``):
Winograd's transformed kernels, and for 3x3 stride-1 'same' convolutions on maps under 4x4 pixels
(ResNet-50's last stage, 2x2) the kernel's taps as separate arrays, one product per tap over the
pixels it sees (``conv_taps``) instead of im2col's product, 5/9 of which multiplies padding there.
``evaluation.evaluate_batches`` derives them and returns them beside its sums;
``layers.Conv2D`` uses them when they are in the ``INFERENCE_KERNELS`` collection. Training keeps
``conv2d`` (per-tap products made its step slower).

Padding follows TensorFlow: 'SAME' pads ``total // 2`` before and the rest after, also for even
windows such as 2x2. Explicit (before, after) pairs give PyTorch's symmetric padding, which for a
3x3 stride-1 convolution is 'SAME' and takes the same fast paths.

``precision`` is JAX's matmul/conv precision ('default' | 'high' | 'highest'). The layers use
'highest', true float32 products on every backend; 'default' lets the backend pick a faster one
(TensorFloat-32 on recent NVIDIA GPUs, bfloat16 passes on TPU). On CPU the two are the same.
"""

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from jax import lax

from resnet_flax.ops import winograd
from resnet_flax.ops.taps import output_size, window_tap

IMPLEMENTATIONS = ("auto", "xla", "gemm", "winograd")
KERNELS = ("xla", "gemm", "winograd2", "winograd4", "taps")  # what one layer can run
INFERENCE_KERNELS = "inference_kernels"  # the flax collection of ``inference_kernel``s
PRECISIONS = ("default", "high", "highest")
Padding = tuple[tuple[int, int], tuple[int, int]]


def resolve_impl(impl: str) -> str:
    """Maps 'auto' to the static implementation for the default backend; a kernel name of
    :data:`KERNELS` passes through."""
    if impl not in IMPLEMENTATIONS and impl not in KERNELS:
        raise ValueError(f"conv_impl must be one of {IMPLEMENTATIONS}, got {impl!r}")
    if impl == "auto":
        return "winograd" if jax.default_backend() == "cpu" else "xla"
    return impl


def kernel_candidates(kernel_shape: Sequence[int], strides: Sequence[int], pads: Padding) -> tuple[str, ...]:
    """The kernels that can compute a convolution of this kernel shape, stride and padding."""
    return KERNELS if _is_3x3_same_stride_1(kernel_shape, strides, pads) else ("xla", "gemm")


def static_kernel(impl: str, kernel_shape: Sequence[int], strides: Sequence[int], pads: Padding,
                  spatial: Sequence[int], inference: bool = False) -> str:
    """The kernel ``impl`` runs for this convolution without a measured choice: 'winograd''s tiles
    where ``winograd_tile_size`` gives one, and where it gives none, im2col in training and the
    per-tap products in evaluation (``inference``) for 3x3 stride-1 'same' convolutions."""
    impl = resolve_impl(impl)
    if impl != "winograd":
        return impl
    tile_size = winograd_tile_size(kernel_shape, strides, pads, spatial)
    if tile_size is not None:
        return f"winograd{tile_size}"
    return "taps" if inference and _is_3x3_same_stride_1(kernel_shape, strides, pads) else "gemm"


def _same_padding(size: int, window: int, stride: int) -> tuple[int, int]:
    out = -(-size // stride)
    total = max((out - 1) * stride + window - size, 0)
    return total // 2, total - total // 2


def explicit_padding(
    spatial: Sequence[int], window: Sequence[int], strides: Sequence[int], padding: str | Padding
) -> Padding:
    """TensorFlow's padding rule as (before, after) pairs for height and width; explicit pairs (as
    PyTorch's ``padding=1`` is ``((1, 1), (1, 1))``) pass through."""
    if not isinstance(padding, str):
        pairs = tuple(tuple(int(p) for p in pair) for pair in padding)
        if len(pairs) != 2 or any(len(pair) != 2 or min(pair) < 0 for pair in pairs):
            raise ValueError(f"explicit padding must be two (before, after) pairs, got {padding!r}")
        return pairs
    if padding == "VALID":
        return ((0, 0), (0, 0))
    if padding == "SAME":
        return tuple(_same_padding(n, k, s) for n, k, s in zip(spatial, window, strides))
    raise ValueError(f"padding must be 'SAME' or 'VALID', got {padding!r}")


def conv_xla(x: jax.Array, kernel: jax.Array, strides: Sequence[int], pads: Padding,
             precision: str | None = None) -> jax.Array:
    return lax.conv_general_dilated(
        x, kernel, tuple(strides), pads, dimension_numbers=("NHWC", "HWIO", "NHWC"),
        precision=precision,
    )


def conv_gemm(x: jax.Array, kernel: jax.Array, strides: Sequence[int], pads: Padding,
              precision: str | None = None) -> jax.Array:
    kh, kw, cin, cout = kernel.shape
    sh, sw = strides
    if any(p for pair in pads for p in pair):
        x = jnp.pad(x, ((0, 0), pads[0], pads[1], (0, 0)))
    n, h, w, _ = x.shape
    ho, wo = output_size(h, kh, sh), output_size(w, kw, sw)

    def shifted(i: int, j: int) -> jax.Array:  # the input pixels kernel tap (i, j) sees
        return window_tap(x, (i, j), (ho, wo), (sh, sw))

    if kh * kw == 1:
        patches = shifted(0, 0)
    else:
        # Stacked along new axes, not concatenated along channels: XLA:CPU fuses a stack of at most
        # 8 arrays with the slices that feed it into one pass, but materialises every tap first
        # for a channel-axis concatenation or one of more than 8 arrays (the 9 taps of a 3x3).
        rows = [jnp.stack([shifted(i, j) for j in range(kw)], axis=3) for i in range(kh)]
        patches = jnp.stack(rows, axis=3)  # (n, ho, wo, kh, kw, cin)
    # Row-major (kh, kw, cin) matches the order of the taps.
    y = patches_times_kernel(patches.reshape(n * ho * wo, kh * kw * cin),
                             kernel.reshape(kh * kw * cin, cout), precision)
    return y.reshape(n, ho, wo, cout)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def patches_times_kernel(patches: jax.Array, kernel: jax.Array, precision: str | None) -> jax.Array:
    """``patches @ kernel``, with a gradient that lets XLA update the kernel in place.

    A training step reads each kernel twice (forward product, input gradient) and then overwrites
    it with the optimizer's update. Nothing orders the input gradient's read before that write,
    so XLA's copy insertion, which runs before scheduling, copied every kernel at the start of
    every step (94 MB for ResNet-50, 2-4% of a CPU step; an ``optimization_barrier`` does not help,
    XLA:CPU removes it first). Here the kernel gradient takes ``0 * d_patches[0, 0]``, one entry of
    the input gradient, which orders it (and so the update) after the read. Adding 0 changes no bit
    (unless that entry is not finite, and then the gradients below this layer are broken anyway).
    """
    return jnp.matmul(patches, kernel, precision=precision)


def _patches_times_kernel_fwd(patches, kernel, precision):
    # symbolic_zeros: ``perturbed`` says whether the patches depend on what is differentiated
    # (False for the stem's image); only then is their gradient computed and kept.
    kept_kernel = kernel.value if patches.perturbed else None
    return patches_times_kernel(patches.value, kernel.value, precision), (patches.value, kept_kernel)


def kernel_gradient(patches: jax.Array, d_out: jax.Array, precision: str | None) -> jax.Array:
    """``patches^T @ d_out``: the product's gradient for the kernel."""
    return jnp.matmul(patches.T, d_out, precision=precision)


def _patches_times_kernel_bwd(precision, residuals, d_out):
    patches, kernel = residuals
    d_kernel = kernel_gradient(patches, d_out, precision)
    if kernel is None:
        return None, d_kernel
    d_patches = jnp.matmul(d_out, kernel.T, precision=precision)
    return d_patches, d_kernel + 0.0 * d_patches[0, 0]


patches_times_kernel.defvjp(_patches_times_kernel_fwd, _patches_times_kernel_bwd, symbolic_zeros=True)


def winograd_tile_size(kernel_shape: Sequence[int], strides: Sequence[int], pads: Padding,
                       spatial: Sequence[int]) -> int | None:
    """The Winograd tile for this convolution under 'winograd', or None where im2col stays.

    Chosen by in-process A/B on the 2-core CPU (experiments/ab_chunk.py): F(4x4, 3x3) where its
    6x6 tiles waste little padding and its transformed kernel (4x the kernel) is reused over enough
    tiles; F(2x2, 3x3) at 4x4 to 7x7 pixels; below 4x4 (ResNet-50's 2x2 stage) the transformed
    kernel costs more than the products save.
    """
    if not _is_3x3_same_stride_1(kernel_shape, strides, pads):
        return None
    side = min(spatial)
    return 4 if side >= 8 else 2 if side >= 4 else None


def _is_3x3_same_stride_1(kernel_shape: Sequence[int], strides: Sequence[int], pads: Padding) -> bool:
    return tuple(kernel_shape[:2]) == (3, 3) and tuple(strides) == (1, 1) and pads == ((1, 1), (1, 1))


def tap_regions(spatial: Sequence[int]) -> list[tuple[tuple[int, int], tuple[slice, slice], tuple[slice, slice]]]:
    """For a 3x3 stride-1 'same' convolution on an H x W map: each kernel tap (a, b) that sees any
    pixel of the map, with the input pixels it sees and the output pixels they go to (slices of
    height and width)."""
    regions = []
    for a in range(3):
        for b in range(3):
            rows = [slice(max(0, d), min(n, n + d)) for d, n in ((a - 1, spatial[0]), (b - 1, spatial[1]))]
            if all(r.start < r.stop for r in rows):
                to = tuple(slice(r.start - d, r.stop - d) for r, d in zip(rows, (a - 1, b - 1)))
                regions.append(((a, b), tuple(rows), to))
    return regions


def conv_taps(x: jax.Array, taps: Sequence[jax.Array], precision: str | None = None) -> jax.Array:
    """A 3x3 stride-1 'same' convolution as one product per kernel tap, over just the pixels that
    tap sees, summed: ``taps`` are the kernel's (C_in, C_out) taps for ``tap_regions``. On ResNet-50's
    2x2 maps each output pixel sees 4 of the 9 taps, so this multiplies 4/9 of what im2col does."""
    n, h, w, c = x.shape
    out = None
    for tap, (_, (rows, cols), (out_rows, out_cols)) in zip(taps, tap_regions((h, w)), strict=True):
        seen = x[:, rows, cols, :]
        y = jnp.matmul(seen.reshape(-1, c), tap, precision=precision).reshape(*seen.shape[:3], -1)
        y = jnp.pad(y, ((0, 0), (out_rows.start, h - out_rows.stop), (out_cols.start, w - out_cols.stop), (0, 0)))
        out = y if out is None else out + y
    return out


def inference_kernel(kernel: jax.Array, spatial: Sequence[int], strides: Sequence[int], pads: Padding,
                     impl: str) -> jax.Array | tuple[jax.Array, ...] | None:
    """What evaluation multiplies by instead of ``kernel``, where that differs: under 'winograd',
    Winograd's transformed kernel (``winograd.kernel_tiles``), or on maps under 4x4 pixels the 3x3
    kernel's taps that see the map, as separate arrays (``conv_taps``); None elsewhere.

    Evaluation derives these once per call and keeps them as outputs of its program: XLA would
    otherwise keep them in the one scratch buffer it maps afresh on every call, which costs a page
    fault per 4 KiB (docs/performance.md)."""
    name = static_kernel(impl, kernel.shape, strides, pads, spatial, inference=True)
    if name.startswith("winograd"):
        return winograd.kernel_tiles(kernel, int(name.removeprefix("winograd")))
    if name == "taps":
        return kernel_taps(kernel, spatial)
    return None


def kernel_taps(kernel: jax.Array, spatial: Sequence[int]) -> tuple[jax.Array, ...]:
    """The 3x3 kernel's taps that see an H x W map, as separate arrays, for ``conv_taps`` (not
    slices taken in a loop over batches: a slice is a copy on XLA:CPU)."""
    return tuple(kernel[a, b] for (a, b), _, _ in tap_regions(spatial))


def conv2d_inference(x: jax.Array, derived: jax.Array | tuple[jax.Array, ...],
                     precision: str | None = "highest") -> jax.Array:
    """The convolution from an ``inference_kernel`` (no gradient)."""
    if isinstance(derived, tuple):
        return conv_taps(x, derived, precision)
    return winograd.conv3x3_from_tiles(x, derived, precision)


def conv2d(
    x: jax.Array,
    kernel: jax.Array,
    strides: Sequence[int] = (1, 1),
    padding: str | Padding = "VALID",
    impl: str = "auto",
    precision: str | None = "highest",
) -> jax.Array:
    """NHWC input, HWIO kernel, TensorFlow padding (or explicit pairs), no bias; ``impl`` one of
    :data:`IMPLEMENTATIONS` or, for one layer, of its ``kernel_candidates``."""
    pads = explicit_padding(x.shape[1:3], kernel.shape[:2], strides, padding)
    name = static_kernel(impl, kernel.shape, strides, pads, x.shape[1:3])
    if name not in kernel_candidates(kernel.shape, strides, pads):
        raise ValueError(f"kernel {name!r} cannot compute a {kernel.shape[0]}x{kernel.shape[1]} convolution "
                         f"with strides {tuple(strides)} and padding {pads}")
    if name == "xla":
        return conv_xla(x, kernel, strides, pads, precision)
    if name.startswith("winograd"):
        return winograd.conv3x3_same(x, kernel, int(name.removeprefix("winograd")), precision)
    if name == "taps":
        return conv_taps(x, kernel_taps(kernel, x.shape[1:3]), precision)
    return conv_gemm(x, kernel, strides, pads, precision)
