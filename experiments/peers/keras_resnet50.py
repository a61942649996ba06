"""The assignment's Keras ResNet-50 (section 4, as written there) on Keras 3's JAX backend, timed
the way experiments/throughput.py times this project: batch 32 of 64x64x3 float32,
``model.compile(optimizer='adam', loss='categorical_crossentropy')``, ``train_on_batch`` steps.

The backend must be chosen before Keras is imported: this file sets ``KERAS_BACKEND=jax`` unless
the environment already names one. Run on its own:
``KERAS_BACKEND=jax python experiments/peers/keras_resnet50.py --steps 20``; with
``--result-file`` it writes its measurements as JSON (what throughput.py reads).
"""

import os

os.environ.setdefault("KERAS_BACKEND", "jax")

import argparse  # noqa: E402
import json  # noqa: E402
import resource  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402
import keras  # noqa: E402

# The assignment's code (sections 2-4), statements unchanged: one copy in the package.
from resnet_flax.keras_io.assignment_model import ResNet50  # noqa: E402


def jax_gemm_gflops(n: int = 2048, reps: int = 5) -> float:
    """Best float32 ``jnp.dot`` rate in this process, for comparing with the driver's."""
    import jax
    import jax.numpy as jnp

    a = jnp.ones((n, n), jnp.float32)
    dot = jax.jit(jnp.dot)
    jax.block_until_ready(dot(a, a))
    best = float("inf")
    for _ in range(reps):
        start = time.perf_counter()
        jax.block_until_ready(dot(a, a))
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best / 1e9


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=20, help="measured train_on_batch steps")
    parser.add_argument("--warmup", type=int, default=3, help="steps before timing (the first compiles)")
    parser.add_argument("--eval-batches", type=int, default=10, help="measured eval batches per size")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--t0", type=float, default=None, help="time.time() at process launch")
    parser.add_argument("--result-file", default=None)
    args = parser.parse_args(argv)
    t0 = args.t0 if args.t0 is not None else time.time()

    import jax

    rng = np.random.default_rng(0)
    num_train, batch = 1080, args.batch_size
    # The assignment's inputs: X / 255. as float32 and one-hot labels.
    x_train = (rng.integers(0, 256, (num_train, 64, 64, 3), dtype=np.uint8) / 255.0).astype(np.float32)
    y_train = keras.utils.to_categorical(rng.integers(0, 6, num_train), 6).astype(np.float32)
    steps_per_epoch = -(-num_train // batch)
    batches = [(x_train[i * batch:(i + 1) * batch], y_train[i * batch:(i + 1) * batch])
               for i in range(num_train // batch)]

    model = ResNet50(input_shape=(64, 64, 3), classes=6)
    model.compile(optimizer='adam', loss='categorical_crossentropy')

    start = time.perf_counter()
    model.train_on_batch(*batches[0])  # traces and compiles the train function, then runs a step
    first_step_s = time.perf_counter() - start
    time_to_first_step_s = time.time() - t0
    for step in range(1, args.warmup):
        model.train_on_batch(*batches[step % len(batches)])
    step_times = []
    for step in range(args.warmup, args.warmup + args.steps):
        start = time.perf_counter()
        loss = model.train_on_batch(*batches[step % len(batches)])  # returns a host float: synced
        step_times.append(time.perf_counter() - start)
    train_seconds = sum(step_times)
    step_s = train_seconds / len(step_times)

    eval_results = {}
    for eval_batch in (32, 40):
        x = x_train[:eval_batch]
        start = time.perf_counter()
        model.predict_on_batch(x)  # compiles the predict function for this shape
        eval_compile = time.perf_counter() - start
        times = []
        for _ in range(args.eval_batches):
            start = time.perf_counter()
            np.asarray(model.predict_on_batch(x))
            times.append(time.perf_counter() - start)
        eval_results[eval_batch] = {"images_per_second": eval_batch * len(times) / sum(times),
                                    "batches": len(times), "seconds": sum(times),
                                    "first_call_seconds": eval_compile}

    result = {
        "config": f"keras {keras.__version__} (jax backend)",
        "framework": "keras",
        "keras_version": keras.__version__,
        "keras_backend": keras.backend.backend(),
        "device": f"{jax.default_backend()}: {jax.devices()[0].device_kind}",
        "batch_size": batch,
        "steps_per_epoch": steps_per_epoch,
        "train_steps": len(step_times),
        "train_seconds": train_seconds,
        "train_images_per_second": batch * len(step_times) / train_seconds,
        "train_step_seconds": step_times,
        "last_loss": float(np.asarray(loss)),
        "eval": eval_results,
        "eval_images_per_second": eval_results[32]["images_per_second"],
        "eval40_images_per_second": eval_results[40]["images_per_second"],
        # The first train_on_batch traces, compiles and runs one step: less one steady step, ~compile.
        "compile_seconds": max(first_step_s - step_s, 0.0),
        "first_step_seconds": first_step_s,
        "time_to_first_step_seconds": time_to_first_step_s,
        "gemm_gflops": jax_gemm_gflops(),
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
    }
    if args.result_file:
        with open(args.result_file, "w") as f:
            json.dump(result, f, indent=1)
    print(f"keras: train {result['train_images_per_second']:.1f} img/s, eval(b32) "
          f"{result['eval_images_per_second']:.1f} img/s, peak RSS "
          f"{result['peak_rss_bytes'] / 2**30:.2f} GiB", file=sys.stderr)
    return result


if __name__ == "__main__":
    main()
