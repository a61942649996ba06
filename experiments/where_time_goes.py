"""Where a ResNet-50 training step and a warm start spend their time on this machine.

Two measurements, each in fresh processes:

* **Step ablations**: the 'gemm' ResNet-50 step (batch 32, donated state, Adam) as
  ``steps.train_step`` computes it, and the same step with one part taken away: BatchNorm's
  padding mask, BatchNorm itself (replaced by a per-channel scale and shift), Adam (replaced by
  plain SGD), the parameter update altogether (gradients only). What a part costs is the
  difference to the full step. One variant puts something back instead: flax's own BatchNorm,
  differentiated op by op, as the model had it before ``resnet_flax/ops/batchnorm.py``.
* **Warm start phases**: a process that starts on a cache filled by an earlier identical process
  (XLA's executables and the exported programs of ``resnet_flax/program_cache.py``), timed from
  interpreter start through imports, ``train.start_training`` (the train state from the saved
  init program, and beside it in a second thread the training chunk from its saved program,
  both compiled from XLA's cache) and the first call (one step alone), as
  ``train.train_and_evaluate`` does.

    python experiments/where_time_goes.py      # ~3 minutes; writes experiments/where_time_goes.md
"""

import argparse
import datetime
import functools
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

T0 = time.time()
HERE = Path(__file__).resolve().parent
VARIANTS = {
    "full step": "as steps.train_step",
    "no BatchNorm mask": "mask=None (the mask keeps padding examples out of the batch statistics)",
    "flax BatchNorm": ("flax.linen.BatchNorm (gradient op by op) on conv output + bias, then ReLU, as before "
                       "ops/batchnorm.py"),
    "no BatchNorm": "every BatchNorm replaced by a per-channel scale and shift",
    "SGD instead of Adam": "params - 1e-3 * grads",
    "gradients only": "no parameter update",
}


def step_worker(variant: str, reps: int) -> dict:
    import flax.linen as nn
    import jax
    import jax.numpy as jnp
    import optax

    from resnet_flax import input_pipeline, layers
    from step_inputs import best_and_median, resnet50_state_and_batch

    factories = {}  # the model's layer factories that the variant replaces (models.layer_factories)
    if variant == "no BatchNorm":
        class ScaleShift(nn.Module):
            use_running_average: bool = False

            @nn.compact
            def __call__(self, x, input_bias=None, *, mask=None, relu=False):
                features = x.shape[-1]
                self.variable("batch_stats", "mean", jnp.zeros, (features,))
                y = (x + input_bias) * self.param("scale", nn.initializers.ones, (features,)) + self.param(
                    "bias", nn.initializers.zeros, (features,))
                return nn.relu(y) if relu else y

        factories["norm"] = ScaleShift
    if variant == "flax BatchNorm":
        class FlaxBatchNorm(nn.BatchNorm):
            """The layer the model had before resnet_flax/ops/batchnorm.py: flax's, differentiated op
            by op, on the conv output plus bias, then a separate ReLU."""

            def __call__(self, x, input_bias=None, *, mask=None, relu=False):
                y = super().__call__(x + input_bias, mask=mask)
                return nn.relu(y) if relu else y

        factories["norm"] = functools.partial(FlaxBatchNorm, momentum=layers.BN_MOMENTUM, epsilon=layers.BN_EPSILON)

    _, state, batch = resnet50_state_and_batch("gemm", **factories)

    def step(state, batch):
        images = input_pipeline.normalize(batch["image"])
        mask = None if variant == "no BatchNorm mask" else batch["mask"]

        def loss_fn(params):
            logits, updates = state.apply_fn({"params": params, "batch_stats": state.batch_stats}, images,
                                             train=True, mask=mask, mutable=["batch_stats"])
            loss = optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"]).mean()
            return loss, updates["batch_stats"]

        grads, batch_stats = jax.grad(loss_fn, has_aux=True)(state.params)
        if variant == "gradients only":
            return state.replace(batch_stats=batch_stats), grads
        if variant == "SGD instead of Adam":
            params = jax.tree.map(lambda p, g: p - 1e-3 * g, state.params, grads)
            return state.replace(params=params, batch_stats=batch_stats), None
        return state.apply_gradients(grads=grads, batch_stats=batch_stats), None

    compiled = jax.jit(step, donate_argnums=0).lower(state, batch).compile()
    state, _ = compiled(state, batch)

    def one_step():
        nonlocal state
        state, out = compiled(state, batch)
        jax.block_until_ready((state, out))

    best, median = best_and_median(one_step, reps)
    return {"best": best, "median": median}


def warm_worker(cache_dir: str) -> dict:
    marks = {}  # seconds since this script's first line ran (the interpreter's own start excluded)

    def mark(name):
        marks[name] = time.time() - T0

    import jax
    import numpy as np

    from resnet_flax import config as config_lib
    from resnet_flax import input_pipeline, models, program_cache, runtime, train
    mark("imports")
    config = config_lib.default_config()
    config.conv_impl = "gemm"
    programs = program_cache.for_config(config, runtime.enable_compilation_cache(cache_dir))
    model = models.model_from_config(config)
    mesh = runtime.make_mesh()
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (1080, 64, 64, 3), dtype=np.uint8)
    labels = rng.integers(0, 6, 1080).astype(np.int32)
    capacity = config.steps_per_chunk
    state, train_chunk, _ = train.start_training(config, model, 34, capacity, mesh, programs)
    jax.block_until_ready(state)
    mark("train state and training chunk (saved programs, cached compiles, two threads)")
    indices, mask = input_pipeline.batch_indices(input_pipeline.epoch_order(0, 1, 1080), 32)
    split = input_pipeline.Split(images, labels, "random uint8")
    state, _ = train_chunk(state, *train.gather_chunk(split, indices, mask, 0, 1, capacity, mesh))
    jax.block_until_ready(state)
    mark("first chunk (1 step, as a run's first call)")
    return marks


def run(args: list[str], env_extra: dict | None = None) -> dict:
    env = {**os.environ, **(env_extra or {})}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(HERE.parent), env.get("PYTHONPATH")]))
    proc = subprocess.run([sys.executable, __file__, *args], env=env, capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"worker {args} failed:\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=8)
    parser.add_argument("--out", default=str(HERE / "where_time_goes.md"))
    parser.add_argument("--step-worker", help=argparse.SUPPRESS)
    parser.add_argument("--warm-worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.step_worker:
        print(json.dumps(step_worker(args.step_worker, args.reps)))
        return 0
    if args.warm_worker:
        print(json.dumps(warm_worker(args.warm_worker)))
        return 0

    started = datetime.datetime.now(datetime.timezone.utc)
    steps = {}
    for variant in VARIANTS:
        steps[variant] = run(["--step-worker", variant, "--reps", str(args.reps)])
        print(variant, steps[variant], file=sys.stderr, flush=True)
    with tempfile.TemporaryDirectory() as cache:
        run(["--warm-worker", cache])  # fills the cache
        warm = run(["--warm-worker", cache])
    print(warm, file=sys.stderr)

    full = steps["full step"]["best"]
    lines = ["# Where the time goes: ResNet-50 step ablations and a warm start", "",
             f"`python experiments/where_time_goes.py`, {started:%Y-%m-%d %H:%M} UTC, "
             f"{len(os.sched_getaffinity(0))} cores, load average after "
             f"{' '.join(Path('/proc/loadavg').read_text().split()[:3])}. 'gemm' convolution, batch 32, "
             f"float32, donated state; best / median of {args.reps} timed steps.", "",
             "| step | what changes | s per step (best / median) | vs full step |", "|---|---|---|---|"]
    for variant, what in VARIANTS.items():
        r = steps[variant]
        lines.append(f"| {variant} | {what} | {r['best']:.3f} / {r['median']:.3f} | {r['best'] - full:+.3f} s |")
    lines += ["", "Warm start (a second process on the caches the first one filled), from the "
              "script's first line:", "",
              "| phase | ends at s | takes s |", "|---|---|---|"]
    previous = 0.0
    for phase, at in warm.items():
        lines.append(f"| {phase} | {at:.2f} | {at - previous:.2f} |")
        previous = at
    Path(args.out).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
