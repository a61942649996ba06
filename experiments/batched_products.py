"""How fast XLA:CPU runs the batched products of the Winograd convolution (issue 5).

``resnet_flax.winograd`` turns each 3x3 convolution into t*t independent products, (tiles, C_in)
@ (C_in, C_out), one per tile position, run as one batched ``dot_general``. This times those
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
        batched = jax.jit(lambda a, b: jnp.matmul(a, b, precision="highest"))
        lhs, rhs = jnp.ones((positions, rows, c_in)), jnp.ones((positions, c_in, c_out))
        jax.block_until_ready(batched(lhs, rhs))  # compiled before timing
        b_best, b_median = best_and_median(lambda: jax.block_until_ready(batched(lhs, rhs)), args.reps)
        single = jax.jit(lambda a, b: jnp.matmul(a, b, precision="highest"))
        one_lhs, one_rhs = jnp.ones((positions * rows, c_in)), jnp.ones((c_in, c_out))
        jax.block_until_ready(single(one_lhs, one_rhs))
        s_best, s_median = best_and_median(lambda: jax.block_until_ready(single(one_lhs, one_rhs)), args.reps)
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
