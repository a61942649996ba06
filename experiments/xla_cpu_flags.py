"""Does an XLA:CPU flag make this project's ResNet-50 step faster?

Each flag set runs in its own process: the 'gemm' ResNet-50 training step (batch 32, donated state,
as ``steps.train_step``) and the inference forward pass, compiled, warmed up, then timed (best and
median of ``--reps``), plus the loss of the first step so a flag that changes the numbers shows.

    python experiments/xla_cpu_flags.py            # writes experiments/xla_cpu_flags.md
"""

import argparse
import datetime
import functools
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
FLAG_SETS = [
    "",
    "--xla_cpu_use_onednn=true",
    "--xla_cpu_experimental_xnn_fusion_type=dot,eltwise,reduce",
    "--xla_cpu_experimental_ynn_fusion_type=dot",
    "--xla_cpu_experimental_ynn_fusion_type=dot,reduce",
    "--xla_cpu_experimental_ynn_fusion_type=dot,eltwise",
    "--xla_cpu_experimental_ynn_fusion_type=dot,eltwise,reduce",
    "--xla_cpu_experimental_xnn_graph_fusion_mode=XNN_GRAPH_FUSION_MODE_GREEDY",
    "--xla_cpu_use_xnnpack=false",
    "--xla_cpu_max_isa=AVX512",
    "--xla_cpu_prefer_vector_width=512",
]


def worker(reps: int) -> dict:
    import jax

    from resnet_flax import input_pipeline, steps
    from step_inputs import best_and_median, resnet50_state_and_batch

    model, state, batch = resnet50_state_and_batch("gemm")
    key = jax.random.key(0)
    step = jax.jit(functools.partial(steps.train_step, num_classes=6), donate_argnums=0)
    start = time.perf_counter()
    step = step.lower(state, batch, key).compile()
    compile_s = time.perf_counter() - start
    state, sums = step(state, batch, key)
    loss = float(sums["loss_sum"] / sums["count"])

    def one_step():
        nonlocal state
        state, _ = step(state, batch, key)
        jax.block_until_ready(state)

    step_best, step_median = best_and_median(one_step, reps)
    variables = {"params": state.params, "batch_stats": state.batch_stats}
    forward = jax.jit(lambda v, x: model.apply(v, x, train=False))
    images = input_pipeline.normalize(batch["image"])
    jax.block_until_ready(forward(variables, images))
    eval_best, eval_median = best_and_median(
        lambda: jax.block_until_ready(forward(variables, images)), reps)
    return {"compile_s": compile_s, "first_loss": loss, "step_best": step_best,
            "step_median": step_median, "eval_best": eval_best, "eval_median": eval_median}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=8)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--out", default=str(HERE / "xla_cpu_flags.md"))
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.reps)))
        return 0

    rows = []
    started = datetime.datetime.now(datetime.timezone.utc)
    for flags in FLAG_SETS:
        env = {**os.environ, "XLA_FLAGS": flags, "JAX_COMPILATION_CACHE_DIR": ""}
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(HERE.parent), env.get("PYTHONPATH")]))
        proc = subprocess.run([sys.executable, __file__, "--worker", "--reps", str(args.reps)],
                              env=env, capture_output=True, text=True)
        if proc.returncode:
            rows.append((flags, None, proc.stderr.strip().splitlines()[-1:]))
        else:
            rows.append((flags, json.loads(proc.stdout.strip().splitlines()[-1]), None))
        print(flags or "(none)", rows[-1][1] or rows[-1][2], file=sys.stderr, flush=True)

    base = rows[0][1]
    lines = ["# XLA:CPU flags and this project's ResNet-50 step", "",
             f"`python experiments/xla_cpu_flags.py`, {started:%Y-%m-%d %H:%M} UTC. 'gemm' convolution, batch 32, "
             "float32, donated train state; best / median of "
             f"{args.reps} timed calls after one warm-up call. Load average after: "
             f"{' '.join(Path('/proc/loadavg').read_text().split()[:3])}.", "",
             "| XLA_FLAGS | train step s (best / median) | vs none | eval forward s (best / median) | vs none | first-step loss | compile s |",
             "|---|---|---|---|---|---|---|"]
    for flags, r, error in rows:
        if r is None:
            lines.append(f"| `{flags}` | failed: {' '.join(error)} | | | | | |")
            continue
        lines.append(
            f"| `{flags or '(none)'}` | {r['step_best']:.3f} / {r['step_median']:.3f} "
            f"| {base['step_best'] / r['step_best']:.2f}x | {r['eval_best']:.3f} / {r['eval_median']:.3f} "
            f"| {base['eval_best'] / r['eval_best']:.2f}x | {r['first_loss']:.6f} | {r['compile_s']:.1f} |")
    cpu = next((l.split(":", 1)[1].strip() for l in Path("/proc/cpuinfo").read_text().splitlines()
                if l.startswith("model name")), platform.processor())
    import jax
    lines += ["", f"Machine: {cpu}, {len(os.sched_getaffinity(0))} cores, jax {jax.__version__}, "
              f"Python {platform.python_version()}."]
    Path(args.out).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
