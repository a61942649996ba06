"""How close each convolution implementation comes to the exact 3x3 'same' convolution.

For the map sizes of ResNet-50 (15x15 and 8x8 take F(4x4, 3x3), 4x4 F(2x2, 3x3) under 'winograd')
and an odd size, compares 'xla', 'gemm' and 'winograd' in float32 with a float64 NumPy reference
(tests/reference.py's, written from the definition): the output, and the gradients of
``sum(sin(conv(x, kernel)))`` for the input and the kernel. Errors are the largest absolute error
divided by the largest absolute reference value.

    python experiments/winograd_accuracy.py     # ~10 s; writes experiments/winograd_accuracy.md
"""

import datetime
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))
from reference import reference_sin_loss_grads  # noqa: E402  (the tests' float64 reference)

from resnet_flax.ops import conv  # noqa: E402

SIDES = (15, 8, 7, 4)
CHANNELS = (32, 48)


def relative_error(got, want) -> float:
    return float(np.abs(np.asarray(got, np.float64) - want).max() / np.abs(want).max())


def main() -> int:
    started = datetime.datetime.now(datetime.timezone.utc)
    lines = ["# Convolution accuracy against a float64 reference", "",
             f"`python experiments/winograd_accuracy.py`, {started:%Y-%m-%d %H:%M} UTC, jax {jax.__version__}, "
             f"float32, precision 'highest'. 3x3 'same' convolution, batch 2, {CHANNELS[0]} -> {CHANNELS[1]} "
             "channels, inputs N(0, 1), kernel N(0, 1/36); max abs error / max abs reference value.", "",
             "| map | implementation (tile) | output | input gradient | kernel gradient |", "|---|---|---|---|---|"]
    for side in SIDES:
        rng = np.random.default_rng(side)
        x = rng.standard_normal((2, side, side, CHANNELS[0])).astype(np.float32)
        kernel = (rng.standard_normal((3, 3, *CHANNELS)) / 6).astype(np.float32)
        y, d_x, d_kernel = reference_sin_loss_grads(x.astype(np.float64), kernel.astype(np.float64))
        for impl in ("xla", "gemm", "winograd"):
            def conv_fn(x, k, impl=impl):
                return conv.conv2d(x, k, padding="SAME", impl=impl)
            out = jax.jit(conv_fn)(x, kernel)
            gx, gk = jax.jit(jax.grad(lambda x, k: jnp.sum(jnp.sin(conv_fn(x, k))), argnums=(0, 1)))(x, kernel)
            tile = conv.winograd_tile_size(kernel.shape, (1, 1), ((1, 1), (1, 1)), (side, side))
            label = f"winograd (F({tile}x{tile}, 3x3))" if impl == "winograd" else impl
            lines.append(f"| {side}x{side} | {label} | {relative_error(out, y):.1e} | "
                         f"{relative_error(gx, d_x):.1e} | {relative_error(gk, d_kernel):.1e} |")
    text = "\n".join(lines) + "\n"
    print(text)
    (HERE / "winograd_accuracy.md").write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
