"""How fast XLA:CPU runs the batched products of the Winograd convolution.

``resnet_flax.ops.winograd`` turns each 3x3 convolution into t*t independent products, (tiles,
C_in) @ (C_in, C_out), one per tile position, run as one batched ``dot_general``. This times those
products at ResNet-50's shapes (batch 32) against a single product with the same number of
multiplications, (t*t*tiles, C_in) @ (C_in, C_out) (one kernel instead of t*t, so less memory
traffic), and reports GFLOP/s for both.

    python experiments/batched_products.py     # ~20 s; writes experiments/batched_products.md
"""

import argparse
import datetime
import os
from pathlib import Path

import jax
import jax.numpy as jnp

from step_inputs import best_and_median

HERE = Path(__file__).resolve().parent

# (layers, tile positions, rows per position, C_in, C_out): F(4x4, 3x3) at 15x15 (16 tiles per
# image) and 8x8 (4), F(2x2, 3x3) at 4x4 (4); the last stage's 2x2 maps would be F(2x2) with one
# tile per image (im2col runs there).
SHAPES = [
    ("stage 2, 15x15, F(4x4)", 36, 32 * 16, 64, 64),
    ("stage 3, 8x8, F(4x4)", 36, 32 * 4, 128, 128),
    ("stage 4, 4x4, F(2x2)", 16, 32 * 4, 256, 256),
    ("stage 5, 2x2, F(2x2) (not used)", 16, 32, 512, 512),
]


@jax.jit
def product(lhs, rhs):
    return jnp.matmul(lhs, rhs, precision="highest")


def timed(lhs_shape, rhs_shape, reps: int) -> tuple[float, float]:
    """Best and median seconds of ``product`` on arrays of these shapes, compiled beforehand."""
    lhs, rhs = jnp.ones(lhs_shape), jnp.ones(rhs_shape)
    jax.block_until_ready(product(lhs, rhs))
    return best_and_median(lambda: jax.block_until_ready(product(lhs, rhs)), reps)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=50)
    parser.add_argument("--out", default=str(HERE / "batched_products.md"))
    args = parser.parse_args()

    started = datetime.datetime.now(datetime.timezone.utc)
    lines = ["# Winograd's batched products against one product of the same size", "",
             f"`python experiments/batched_products.py`, {started:%Y-%m-%d %H:%M} UTC, "
             f"{len(os.sched_getaffinity(0))} cores, jax {jax.__version__}, float32, precision "
             f"'highest'; best / median of {args.reps} calls.", "",
             "| layer | batched product | ms | GFLOP/s (best) | one product, same FLOPs | ms | GFLOP/s (best) |",
             "|---|---|---|---|---|---|---|"]
    for name, positions, rows, c_in, c_out in SHAPES:
        flops = 2 * positions * rows * c_in * c_out
        b_best, b_median = timed((positions, rows, c_in), (positions, c_in, c_out), args.reps)
        s_best, s_median = timed((positions * rows, c_in), (c_in, c_out), args.reps)
        lines.append(
            f"| {name} | {positions} x ({rows}, {c_in}) @ ({c_in}, {c_out}) | {b_best * 1e3:.2f} / "
            f"{b_median * 1e3:.2f} | {flops / b_best / 1e9:.0f} | ({positions * rows}, {c_in}) @ "
            f"({c_in}, {c_out}) | {s_best * 1e3:.2f} / {s_median * 1e3:.2f} | {flops / s_best / 1e9:.0f} |")
    text = "\n".join(lines) + "\n"
    print(text)
    Path(args.out).write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
