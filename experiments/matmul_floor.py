"""How fast ResNet-50 could train here if nothing but its matrix products took time.

With ``conv_impl='gemm'`` every convolution of the assignment's ResNet-50 is one matrix product
forward and two backward (the input's gradient, the kernel's gradient). This script times each
of those products alone, at its real shape for a batch of 32 (64x64 images), as XLA's CPU
backend runs them (``jnp.dot`` / ``lax.dot_general``, precision 'highest', best of ``--reps``),
and adds them up per ResNet-50 step. The sum is a floor for the training step and the forward
sum one for evaluation: everything else (im2col, BatchNorm, ReLU, pooling, Adam) comes on top.
The last columns time each kernel gradient from an input stored transposed, and the same with
the transposed copy made first.

    python experiments/matmul_floor.py     # ~1 minute; writes experiments/matmul_floor.md
"""

import argparse
import datetime
import os
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from step_inputs import best_and_median

HERE = Path(__file__).resolve().parent
BATCH = 32
HIGHEST = lax.Precision.HIGHEST


def resnet50_products(batch: int = BATCH) -> list[tuple[str, int, int, int, int, bool]]:
    """(layer, M, K, N, how many such layers, whether its input needs a gradient) for every
    convolution as a matrix product (M output pixels x K kernel taps*channels x N filters)."""
    layers = [("conv1 7x7/2", batch * 32 * 32, 7 * 7 * 3, 64, 1, False)]  # the image needs no gradient
    # stage, output size, input channels, filters, identity blocks
    for stage, size, channels, (f1, f2, f3), identity_blocks in (
            (2, 15, 64, (64, 64, 256), 2), (3, 8, 256, (128, 128, 512), 3),
            (4, 4, 512, (256, 256, 1024), 5), (5, 2, 1024, (512, 512, 2048), 2)):
        m = batch * size * size
        layers += [
            (f"{stage}a 1x1 reduce", m, channels, f1, 1, True),
            (f"{stage}a 3x3", m, 9 * f1, f2, 1, True),
            (f"{stage}a 1x1 expand", m, f2, f3, 1, True),
            (f"{stage}a 1x1 shortcut", m, channels, f3, 1, True),
            (f"{stage}b.. 1x1 reduce", m, f3, f1, identity_blocks, True),
            (f"{stage}b.. 3x3", m, 9 * f1, f2, identity_blocks, True),
            (f"{stage}b.. 1x1 expand", m, f2, f3, identity_blocks, True),
        ]
    return layers


forward = jax.jit(lambda x, w: jnp.dot(x, w, precision=HIGHEST))
input_grad = jax.jit(lambda g, w: lax.dot_general(g, w, (((1,), (1,)), ((), ())), precision=HIGHEST))
kernel_grad = jax.jit(lambda x, g: lax.dot_general(x, g, (((0,), (0,)), ((), ())), precision=HIGHEST))
# The same kernel gradient from an input already stored transposed, (K, M): an ordinary product.
kernel_grad_from_transposed = jax.jit(lambda xt, g: jnp.dot(xt, g, precision=HIGHEST))
# ...and with the transposed copy made first (the barrier keeps XLA from folding it away).
kernel_grad_via_copy = jax.jit(lambda x, g: jnp.dot(lax.optimization_barrier(x.T), g, precision=HIGHEST))


def best_seconds(fn, *args, reps: int) -> float:
    fn(*args).block_until_ready()  # compile and warm up
    return best_and_median(lambda: fn(*args).block_until_ready(), reps)[0]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=15)
    parser.add_argument("--out", default=str(HERE / "matmul_floor.md"))
    args = parser.parse_args()
    started = datetime.datetime.now(datetime.timezone.utc)
    rng = np.random.default_rng(0)
    rows, totals, flops = [], {"forward": 0.0, "input grad": 0.0, "kernel grad": 0.0}, dict.fromkeys(
        ("forward", "input grad", "kernel grad"), 0.0)
    transposed_total = via_copy_total = 0.0
    for name, m, k, n, count, needs_input_grad in resnet50_products():
        x, w, g = (jnp.asarray(rng.standard_normal(shape, np.float32)) for shape in ((m, k), (k, n), (m, n)))
        seconds = {"forward": best_seconds(forward, x, w, reps=args.reps),
                   "input grad": best_seconds(input_grad, g, w, reps=args.reps) if needs_input_grad else 0.0,
                   "kernel grad": best_seconds(kernel_grad, x, g, reps=args.reps)}
        transposed = best_seconds(kernel_grad_from_transposed, jnp.asarray(np.asarray(x).T.copy()), g,
                                  reps=args.reps)
        transposed_total += count * transposed
        via_copy = best_seconds(kernel_grad_via_copy, x, g, reps=args.reps)
        via_copy_total += count * via_copy
        product_flops = 2 * m * k * n
        cells = []
        for part, s in seconds.items():
            totals[part] += count * s
            flops[part] += count * product_flops * (s > 0)
            cells.append(f"{s * 1e3:.2f} ({product_flops / s / 1e9:.0f})" if s else "-")
        cells += [f"{transposed * 1e3:.2f} ({product_flops / transposed / 1e9:.0f})", f"{via_copy * 1e3:.2f}"]
        rows.append(f"| {name} | {m} | {k} | {n} | {count} | " + " | ".join(cells) + " |")
        print(rows[-1], file=sys.stderr, flush=True)

    step = sum(totals.values())
    lines = [
        "# The matrix-product floor of a ResNet-50 step", "",
        f"`python experiments/matmul_floor.py`, {started:%Y-%m-%d %H:%M} UTC, "
        f"{len(os.sched_getaffinity(0))} cores, jax {jax.__version__} on {jax.default_backend()}, load "
        f"average after {' '.join(Path('/proc/loadavg').read_text().split()[:3])}. Each product of "
        f"the 'gemm' convolutions alone, batch {BATCH}, float32 'highest', best of {args.reps}: "
        "ms (GFLOP/s).", "",
        "| layer | M | K | N | layers | forward | input grad | kernel grad | kernel grad, input stored (K, M) "
        "| the same with the transposed copy made first (ms) |",
        "|---|---|---|---|---|---|---|---|---|---|",
        *rows, "",
        "| part | ms per step | GFLOP | GFLOP/s |", "|---|---|---|---|",
        *(f"| {part} | {totals[part] * 1e3:.1f} | {flops[part] / 1e9:.2f} | {flops[part] / totals[part] / 1e9:.0f} |"
          for part in totals),
        f"| training step | {step * 1e3:.1f} | {sum(flops.values()) / 1e9:.2f} | "
        f"{sum(flops.values()) / step / 1e9:.0f} |", "",
        f"With nothing but these products a training step would take {step * 1e3:.0f} ms "
        f"({BATCH / step:.0f} img/s) and an evaluation batch {totals['forward'] * 1e3:.0f} ms "
        f"({BATCH / totals['forward']:.0f} img/s). Compare the measured step in "
        "[throughput.md](throughput.md).", "",
        f"The kernel gradients contract over the M pixels of both operands. From an input already "
        f"stored transposed, (K, M), the same products take {transposed_total * 1e3:.1f} ms instead of "
        f"{totals['kernel grad'] * 1e3:.1f} ms; but making that transposed copy first costs what it "
        f"saves ({via_copy_total * 1e3:.1f} ms with the copy). XLA folds a plain transpose into the "
        "product's dimension numbers, so the layout would have to come out of the fusions that "
        "produce the input (im2col, BatchNorm + ReLU) as a second output.",
    ]
    Path(args.out).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
