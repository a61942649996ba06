"""Throughput of this project's ResNet-50 against PyTorch and Keras on the same machine.

One run measures, each configuration in its own subprocess one after the other (so threads and
memory peaks do not mix):

* ``jax-xla``, ``jax-gemm`` and ``jax-winograd``: this project's real training path --
  ``steps.create_train_state``, ``steps.make_train_chunk`` (a loop over chunks of up to
  ``steps_per_chunk`` steps: 12, 11, 11 for the 34 steps of a SIGNS epoch, after a first call of
  one step) on random uint8 images of SIGNS's shape (1080 x 64x64x3) gathered chunk by chunk, and
  ``evaluation.evaluation_program`` for evaluation (batch 40 as the config has it, and batch 32).
  ResNet-50, batch 32, float32, ``conv_impl`` 'xla', 'gemm' or 'winograd' (the CPU default).
* ``pytorch``: the same architecture in PyTorch on the CPU (experiments/peers/torch_resnet50.py).
* ``keras``: the assignment's Keras model on Keras 3's JAX backend (experiments/peers/keras_resnet50.py).

For each: steady-state training and evaluation images/s (timed after warm-up), the cold compile
time (``jit(...).lower(...).compile()`` wall time), the time from process start to the end of the
first training step, and the peak RSS (``ru_maxrss`` of that subprocess). For JAX, a second short
process then starts again with the persistent compilation cache the first one filled (as a second
``resnet_flax.main`` run finds it) and measures its compile time and time to the first step. The
run also measures the machine's float32 matmul rate (2048^3 ``jnp.dot``) and takes a training
step's FLOPs from XLA's cost analysis, to say how far each configuration is from the matmul floor.

Writes ``experiments/throughput.md`` and ``experiments/throughput.json``.

    python experiments/throughput.py                 # the full run (~10 minutes on 2 cores)
    python experiments/throughput.py --quick         # a smoke check: a few steps, writes nothing
    python experiments/throughput.py --only=jax,torch --steps=40
    python experiments/throughput.py --only=jax --precision=default   # e.g. TF32 on a GPU
"""

import argparse
import datetime
import functools
import importlib.metadata
import json
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
PEERS = HERE / "peers"
NUM_TRAIN, NUM_TEST, NUM_CLASSES = 1080, 120, 6
GROUPS = ("jax", "torch", "keras")
# 'tuned': conv_impl 'auto' after `python -m resnet_flax.autotune` measured this machine's kernels.
IMPLS = ("xla", "gemm", "winograd", "tuned")
# --model: (config.model, config.variant); the PyTorch peer builds the same (peers/torch_resnet50.py).
MODELS = {"resnet50": ("resnet50", "assignment"), "torchvision-resnet50": ("resnet50", "torchvision"),
          "torchvision-resnet18": ("resnet18", "torchvision")}
MODEL_DESCRIPTIONS = {"resnet50": "ResNet-50 (the assignment's)", "torchvision-resnet50": "ResNet-50 (torchvision's layout)",
                      "torchvision-resnet18": "ResNet-18 (torchvision's layout)"}
DEFAULT_WORKLOAD = {"model": "resnet50", "image_size": 64, "batch": 32}
# The workload being measured (set_workload): the assignment's by default.
MODEL, IMAGE_SIZE, BATCH = DEFAULT_WORKLOAD.values()
STEPS_PER_EPOCH = -(-NUM_TRAIN // BATCH)  # 34: what a SIGNS epoch costs, the padded batch included


def set_workload(model: str, image_size: int, batch: int) -> None:
    """Which model, image size and batch this process measures (or renders)."""
    global MODEL, IMAGE_SIZE, BATCH, STEPS_PER_EPOCH
    MODEL, IMAGE_SIZE, BATCH = model, image_size, batch
    STEPS_PER_EPOCH = -(-NUM_TRAIN // BATCH)


def train_budget_s() -> int:
    """A JAX worker's time budget: a minute for the assignment's step (64x64, batch 32), grown with
    the pixels a larger step sees, so its chunks fit as the assignment's do."""
    return round(60 * max(1.0, IMAGE_SIZE ** 2 * BATCH / (64 ** 2 * 32)))


def is_default_workload() -> bool:
    return (MODEL, IMAGE_SIZE, BATCH) == tuple(DEFAULT_WORKLOAD.values())


def workload_config(impl: str, precision: str = "highest"):
    """The default config for the workload, its convolutions by ``impl``."""
    from resnet_flax import config as config_lib
    config = config_lib.default_config()
    config.model, config.variant = MODELS[MODEL]
    config.image_size, config.batch_size = IMAGE_SIZE, BATCH
    config.conv_impl = "auto" if impl == "tuned" else impl
    config.matmul_precision = precision
    return config


# ---------------------------------------------------------------------------------------------
# Workers: each runs in its own subprocess and writes a JSON result file.


def _cost_flops(compiled) -> float | None:
    analysis = compiled.cost_analysis()
    if isinstance(analysis, (list, tuple)):  # older JAX: one dict per computation
        analysis = analysis[0] if analysis else {}
    return float(analysis["flops"]) if analysis and "flops" in analysis else None


def jax_gemm(n: int = 2048, reps: int = 10) -> dict:
    """Seconds of ``n x n @ n x n`` float32 ``jnp.dot`` on the default device (sorted), and GFLOP/s."""
    import jax
    import jax.numpy as jnp

    a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
    b = jax.random.normal(jax.random.key(1), (n, n), jnp.float32)
    dot = jax.jit(jnp.dot)
    jax.block_until_ready(dot(a, b))
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        jax.block_until_ready(dot(a, b))
        times.append(time.perf_counter() - start)
    times.sort()
    return {"gemm_n": n, "gemm_seconds": times, "gemm_gflops_best": 2 * n**3 / times[0] / 1e9,
            "gemm_gflops_median": 2 * n**3 / times[len(times) // 2] / 1e9}


def worker_machine(args) -> dict:
    """The float32 matmul rate of the default JAX device, what that device is, and the workload's
    FLOPs as direct convolutions."""
    import jax

    device = jax.devices()[0]
    return {"backend": jax.default_backend(), "device_kind": device.device_kind, "device": str(device),
            "device_count": jax.device_count(), **jax_gemm(reps=args.gemm_reps), **direct_conv_flops()}


def direct_conv_flops() -> dict:
    """FLOPs (2 per multiply-add) of the workload's convolutions computed directly, every tap
    counted: the same work for every implementation and framework. Training is three times the
    forward pass (forward, input and kernel gradients) less the stem's input gradient."""
    from resnet_flax import autotune, models

    config = workload_config("gemm")
    specs = autotune.model_conv_specs(models.model_from_config(config), BATCH, IMAGE_SIZE, "train", distinct=False)

    def flops(spec):
        n, h, w, _ = spec.input_shape
        kh, kw, cin, cout = spec.kernel_shape
        (top, bottom), (left, right) = spec.pads
        ho = (h + top + bottom - kh) // spec.strides[0] + 1
        wo = (w + left + right - kw) // spec.strides[1] + 1
        return 2 * n * ho * wo * kh * kw * cin * cout

    per_layer = [flops(spec) for spec in specs]
    return {"conv_flops_forward": sum(per_layer), "conv_flops_train": 3 * sum(per_layer) - per_layer[0]}


def worker_jax(args) -> dict:
    """This project's ResNet-50 training and evaluation, called as ``train.train_and_evaluate`` calls
    them: ``train.start_training`` (the train state, and the training chunk compiled beside it
    through the run's exported-program cache), each chunk's batches gathered on the host
    (``runtime.gather_batches``); evaluation by ``evaluation.evaluation_program``."""
    t0 = args.t0

    import jax
    import jax.numpy as jnp
    import numpy as np
    from resnet_flax.ops.conv_plan import ConvSpec
    from resnet_flax import (autotune, checkpoints, evaluation, feeds, input_pipeline, models, program_cache,
                             runtime, steps, train)

    compilation_cache = runtime.enable_compilation_cache(args.cache_dir) if args.cache_dir else None
    config = workload_config(args.impl, args.precision)
    if args.cache_dir:
        config.compilation_cache_dir = args.cache_dir
    # 'tuned': the kernels the driver's `python -m resnet_flax.autotune` measured into this cache,
    # as a run takes them (autotune.plan_for_run, for a fresh workdir).
    conv_plan = None
    if args.impl == "tuned":
        with tempfile.TemporaryDirectory() as workdir:
            conv_plan, _ = autotune.plan_for_run(config, models.model_from_config(config), Path(workdir), False,
                                                 compilation_cache)
    model = models.model_from_config(config, conv_plan=conv_plan)
    eval_model = models.model_from_config(config, conv_plan=conv_plan.in_mode("eval")) if conv_plan else model
    capacity = min(config.steps_per_chunk, STEPS_PER_EPOCH)
    evaluate = evaluation.evaluation_program(eval_model.apply, NUM_CLASSES)
    mesh = runtime.make_mesh()
    rng_np = np.random.default_rng(0)
    images = rng_np.integers(0, 256, (NUM_TRAIN, IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)
    labels = rng_np.integers(0, NUM_CLASSES, NUM_TRAIN).astype(np.int32)
    rng = jax.random.key(config.seed)
    data_path = "each chunk's batches gathered on the host (runtime.gather_batches)"

    def batch_args(idx, m):
        return (runtime.gather_batches(images, labels, idx, m, mesh),)

    # The chunks of an epoch as train_and_evaluate runs them: a first call of one step alone, then
    # near-equal chunks of up to steps_per_chunk steps (34 -> 12, 11, 11).
    split = input_pipeline.Split(images, labels, "random uint8")
    indices, mask = input_pipeline.batch_indices(
        input_pipeline.epoch_order(config.seed, 1, NUM_TRAIN), BATCH)
    lengths = train.chunk_lengths(STEPS_PER_EPOCH, capacity)
    epoch_chunks = list(zip(np.cumsum([0] + lengths[:-1]), lengths))

    def run_chunk(state, begin, length):
        return train_chunk(state, *feeds.gather_chunk(split, indices, mask, begin, length, capacity, mesh))

    # Cold compile of the training chunk: this process has compiled nothing of this model before,
    # and the driver gives the first process an empty compilation cache (it strips
    # JAX_COMPILATION_CACHE_*); a --first-step-only process then starts again on the filled cache
    # (XLA's executables and the exported programs beside them), as a second run would.
    state, train_chunk, compile_s = train.start_training(
        config, model, STEPS_PER_EPOCH, capacity, mesh, program_cache.for_config(config, compilation_cache, conv_plan))

    start = time.perf_counter()
    state, sums = run_chunk(state, 0, 1)
    jax.block_until_ready((state, sums))
    first_chunk_s = time.perf_counter() - start
    time_to_first_step = time.time() - t0
    if args.first_step_only:
        return {"config": f"jax {args.impl} (warm cache)", "compile_seconds": compile_s,
                "time_to_first_step_seconds": time_to_first_step, "peak_rss_bytes": _peak_rss()}
    # Where a step is so slow (XLA's CPU convolutions: tens of seconds) that one chunk would not fit
    # the whole budget, the same program runs one step per call. Every other config is timed in
    # whole chunks, as the real loop runs them: one step per call maps the step's scratch memory
    # afresh each time (the same step jitted alone took 4-37% longer than in the chunks in every
    # by-size report on a 2-core Xeon). The first call took 1.7-3.1x a chunk's step there, so it is
    # held against the whole budget, and larger images get a budget grown with their work.
    mean_length = STEPS_PER_EPOCH / len(epoch_chunks)
    if first_chunk_s * mean_length > args.budget_s:
        epoch_chunks, mean_length = [(b, 1) for b in range(STEPS_PER_EPOCH)], 1
    # Warm-up: more chunks unless the first was already slow (their later steps are no faster).
    warmup_start, last_chunk_s = time.perf_counter(), first_chunk_s
    for i in range(1, args.warmup_chunks):
        if first_chunk_s + time.perf_counter() - warmup_start > args.budget_s / 3:
            break
        start = time.perf_counter()
        state, sums = run_chunk(state, *epoch_chunks[i % len(epoch_chunks)])
        jax.block_until_ready((state, sums))
        last_chunk_s = time.perf_counter() - start

    # Steady state as the real loop runs it: the next chunk is dispatched before the host waits for
    # the previous chunk's sums. chunk_ready[i]: when chunk i's sums were on the host.
    # As many chunks as --steps asks, fewer if they would take more than --budget-s.
    num_chunks = max(1, min(round(args.steps / mean_length), int(args.budget_s / last_chunk_s)))
    start = time.perf_counter()
    chunk_ready, pending, timed_steps = [], None, 0
    for i in range(num_chunks):
        begin, length = epoch_chunks[(args.warmup_chunks + i) % len(epoch_chunks)]
        state, sums = run_chunk(state, begin, length)
        timed_steps += length
        if pending is not None:
            jax.device_get(pending)
            chunk_ready.append(time.perf_counter() - start)
        pending = sums
    last = jax.device_get(pending)
    jax.block_until_ready(state)
    train_s = time.perf_counter() - start
    chunk_ready.append(train_s)
    chunk_times = [b - a for a, b in zip([0.0] + chunk_ready[:-1], chunk_ready)]
    loss = float(np.sum(last["loss_sum"]) / np.sum(last["count"]))  # the chunk's sums are per step

    # Evaluation: SIGNS's 120 test images in batches of 40 (the config's eval_batch_size), and 128
    # images in batches of 32, so neither has padding. The batches are prepared once, as the real
    # run prepares the test set once.
    variables = checkpoints.split_state(state)[0]
    eval_results = {}
    for eval_batch, count in ((32, 128), (config.eval_batch_size, NUM_TEST)):
        eval_inputs = batch_args(*input_pipeline.batch_indices(np.arange(count), eval_batch))
        start = time.perf_counter()
        compiled = evaluate.lower(variables, *eval_inputs).compile()
        eval_compile_s = time.perf_counter() - start
        jax.block_until_ready(compiled(variables, *eval_inputs))
        reps = 0
        start = time.perf_counter()
        while reps * count < args.eval_images and (reps == 0 or time.perf_counter() - start < args.budget_s / 4):
            jax.block_until_ready(compiled(variables, *eval_inputs))
            reps += 1
        seconds = time.perf_counter() - start
        eval_results[eval_batch] = {"images_per_second": count * reps / seconds, "images": count * reps,
                                    "seconds": seconds, "compile_seconds": eval_compile_s}

    # FLOPs of one training step (batch 32) and one inference batch, as XLA's cost analysis counts them.
    batch = {"image": jnp.asarray(images[:BATCH]), "label": jnp.asarray(labels[:BATCH]),
             "mask": jnp.ones((BATCH,), bool)}
    step = functools.partial(steps.train_step, num_classes=NUM_CLASSES)
    start = time.perf_counter()
    step_compiled = jax.jit(step).lower(state, batch, rng).compile()
    step_compile_s = time.perf_counter() - start
    # The same step jitted alone (no scan): what the chunked scan costs or saves.
    jax.block_until_ready(step_compiled(state, batch, rng))
    reps, start = 0, time.perf_counter()
    while reps < 3 and (reps == 0 or time.perf_counter() - start < args.budget_s / 4):
        jax.block_until_ready(step_compiled(state, batch, rng))
        reps += 1
    single_step_s = (time.perf_counter() - start) / reps
    forward = functools.partial(steps.eval_step, model.apply, num_classes=NUM_CLASSES)
    forward_compiled = jax.jit(forward).lower(variables, batch).compile()

    result = {
        "config": f"jax {args.impl}",
        "framework": "jax",
        "conv_impl": args.impl,
        # Layers whose measured kernel differs from the static rule's ('tuned' only).
        "kernels_changed": sum(kernel != ConvSpec.from_key(key).static_kernel()
                               for key, kernel in (conv_plan.as_dict() if conv_plan else {}).items()),
        "precision": args.precision,
        "device": f"{jax.default_backend()}: {jax.devices()[0].device_kind}",
        "batch_size": BATCH,
        "steps_per_chunk": capacity,
        "chunk_lengths": sorted({length for _, length in epoch_chunks}, reverse=True),
        "data_path": data_path,
        "train_steps": timed_steps,
        "train_seconds": train_s,
        "train_images_per_second": BATCH * timed_steps / train_s,
        "train_chunk_seconds": chunk_times,
        "last_loss": loss,
        "eval": eval_results,
        "eval_images_per_second": eval_results[32]["images_per_second"],
        "eval40_images_per_second": eval_results[config.eval_batch_size]["images_per_second"],
        "compile_seconds": compile_s,
        "first_chunk_seconds": first_chunk_s,
        "time_to_first_step_seconds": time_to_first_step,
        "single_step_compile_seconds": step_compile_s,
        "single_step_seconds": single_step_s,
        "single_step_reps": reps,
        "gemm_gflops": jax_gemm(reps=5)["gemm_gflops_best"],
        "flops_per_train_step_xla": _cost_flops(step_compiled),
        "flops_per_eval_batch_xla": _cost_flops(forward_compiled),
        "peak_rss_bytes": _peak_rss(),
    }
    stats = jax.devices()[0].memory_stats() if jax.default_backend() != "cpu" else None
    if stats and "peak_bytes_in_use" in stats:
        result["device_peak_bytes"] = stats["peak_bytes_in_use"]
    return result


def _peak_rss() -> int:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB


# ---------------------------------------------------------------------------------------------
# The model's FLOPs by hand, to check XLA's count.


def _taps_on_image(size: int, window: int) -> int:
    """(output position, tap) pairs of a stride-1 'same' window along one axis that land on the
    image rather than on the zero padding."""
    pad = (window - 1) // 2
    return sum(1 for o in range(size) for t in range(window) if 0 <= o + t - pad < size)


def analytic_flops(batch: int = BATCH, size: int = IMAGE_SIZE, classes: int = NUM_CLASSES) -> dict:
    """Multiply-add FLOPs (2 per MAC) of the convolutions and the dense layer of ResNet-50.

    Training counts the forward pass, the weight gradients (as many FLOPs again) and the input
    gradients (again, except for conv1, whose input is the image). BatchNorm, ReLU, pooling and
    Adam are elementwise and left out (about 1%). ``*_on_image`` leaves out the taps of the 3x3
    'same' convolutions that fall on the zero padding, which XLA's cost analysis does not count
    (conv1's padding is an explicit ``jnp.pad``, so its taps all count).
    """
    convs = []  # (output height, output width, kernel taps counted, taps on the image, cin, cout)
    h = (size + 6 - 7) // 2 + 1  # zero-pad 3, 7x7/2: 32
    convs.append((h * h * 49, h * h * 49, 3, 64))
    h = (h - 3) // 2 + 1  # max-pool 3x3/2 'valid': 15
    cin = 64
    for index, (blocks, (f1, f2, f3)) in enumerate(
            ((3, (64, 64, 256)), (4, (128, 128, 512)), (6, (256, 256, 1024)), (3, (512, 512, 2048)))):
        s = 1 if index == 0 else 2
        h = (h - 1) // s + 1
        one, three = h * h, h * h * 9
        three_on_image = _taps_on_image(h, 3) ** 2
        convs += [(one, one, cin, f1), (three, three_on_image, f1, f2), (one, one, f2, f3),
                  (one, one, cin, f3)]
        cin = f3
        convs += [(one, one, cin, f1), (three, three_on_image, f1, f2), (one, one, f2, f3)] * (blocks - 1)
    dense = 2 * batch * 2048 * classes
    counts = {}
    for name, column in (("", 0), ("_on_image", 1)):
        per = [2 * batch * c[column] * c[2] * c[3] for c in convs]
        forward = sum(per) + dense
        counts["forward" + name] = forward
        counts["train" + name] = 3 * forward - per[0]
    return counts


# ---------------------------------------------------------------------------------------------
# The driver


def load_average() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def cpu_description() -> str:
    """The CPU's name, family and model and its widest vector set: "AMD EPYC" and "Intel(R) Xeon(R)
    Processor" each name CPUs with and without AVX-512, whose speed ratios differ."""
    fields = {}
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        name, _, value = (part.strip() for part in line.partition(":"))
        if not name:
            break  # the first processor's block is enough
        fields.setdefault(name, value)
    if "model name" not in fields:
        return "unknown"
    flags = fields.get("flags", "").split()
    vectors = "AVX-512" if "avx512f" in flags else "AVX2" if "avx2" in flags else "no AVX2"
    return f"{fields['model name']} (family {fields.get('cpu family', '?')} model {fields.get('model', '?')}, {vectors})"


def machine_info() -> dict:
    cpu = cpu_description()
    mem = next((int(line.split()[1]) * 1024 for line in Path("/proc/meminfo").read_text().splitlines()
                if line.startswith("MemTotal")), None)
    versions = {}
    for name in ("jax", "jaxlib", "flax", "optax", "numpy", "torch", "keras"):
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return {"cpu": cpu, "cores": len(os.sched_getaffinity(0)), "cpu_count": os.cpu_count(),
            "memory_gib": mem / 2**30 if mem else None, "python": platform.python_version(),
            "platform": platform.platform(), "versions": versions,
            "xla_flags": os.environ.get("XLA_FLAGS", ""),
            # The memory allocator every config ran with (inherited by the subprocesses).
            "allocator": " ".join(f"{k}={os.environ[k]}" for k in ("LD_PRELOAD", "MALLOC_CONF")
                                  if os.environ.get(k)) or "the C library's malloc"}


def worker_env(env_extra: dict | None = None) -> dict:
    """A subprocess's environment: this one's, without a JAX compilation cache of its own, the
    repository on the path."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("JAX_COMPILATION_CACHE")}
    env.update(env_extra or {})
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    return env


def run_worker(name: str, argv: list[str], env_extra: dict | None = None, timeout: float = 1500) -> dict:
    """Runs ``argv`` (+ --t0, --result-file) in a fresh Python, returns its JSON or the failure."""
    env = worker_env(env_extra)
    with tempfile.TemporaryDirectory() as tmp:
        result_file = Path(tmp) / "result.json"
        full = [sys.executable, *argv, "--t0", repr(time.time()), "--result-file", str(result_file)]
        print(f"[{name}] {' '.join(shlex.quote(a) for a in full[1:-4])}", file=sys.stderr, flush=True)
        start, load_start = time.perf_counter(), load_average()
        try:
            proc = subprocess.run(full, env=env, cwd=REPO, timeout=timeout)
            returncode = proc.returncode
        except subprocess.TimeoutExpired:
            returncode = "timeout"
        wall = time.perf_counter() - start
        if returncode == 0 and result_file.is_file():
            result = json.loads(result_file.read_text())
            result.update(process_seconds=wall, load_average_start=load_start, load_average_end=load_average())
            return result
    print(f"[{name}] failed ({returncode})", file=sys.stderr, flush=True)
    return {"config": name, "error": f"exit status {returncode}", "process_seconds": wall}


def workload_argv() -> list[str]:
    return ["--model", MODEL, "--image-size", str(IMAGE_SIZE), "--batch", str(BATCH)]


def tune_argv(cache_dir: str) -> list[str]:
    """``python -m resnet_flax.autotune`` for the workload's config, into ``cache_dir``."""
    model, variant = MODELS[MODEL]
    return ["-m", "resnet_flax.autotune", f"--config={REPO / 'configs' / 'default.py'}", f"--config.model={model}",
            f"--config.variant={variant}", f"--config.image_size={IMAGE_SIZE}", f"--config.batch_size={BATCH}",
            f"--config.compilation_cache_dir={cache_dir}"]


def run_tuning(cache_dir: str) -> float:
    """Measures the workload's kernels into ``cache_dir`` (a subprocess); returns its wall time."""
    start = time.perf_counter()
    print("[autotune] python " + " ".join(tune_argv(cache_dir)), file=sys.stderr, flush=True)
    subprocess.run([sys.executable, *tune_argv(cache_dir)], env=worker_env(), cwd=REPO, check=True)
    return time.perf_counter() - start


def jax_worker_argv(impl: str, precision: str, cache_dir: str, steps: int, quick: bool = False,
                    first_step_only: bool = False) -> list[str]:
    """The command line of a JAX config's worker: the measuring one, or with ``first_step_only``
    the warm start on the cache the measuring one filled."""
    common = [__file__, "--worker", "jax", "--impl", impl, "--precision", precision, "--cache-dir", cache_dir,
              *workload_argv()]
    if first_step_only:
        return [*common, "--first-step-only"]
    return [*common, "--steps", str(steps), *(["--quick"] if quick else []),
            "--warmup-chunks", "1" if quick else "2",
            "--eval-images", "128" if quick else "320",
            "--budget-s", "20" if quick else str(train_budget_s())]


def peer_worker_argv(script: str, steps: int, quick: bool = False) -> list[str]:
    """The command line of a peer's measuring script (``peers/torch_resnet50.py`` or Keras's)."""
    workload = ["--model", MODEL, "--image-size", str(IMAGE_SIZE)] if script.startswith("torch") else []
    return [str(PEERS / script), "--steps", str(steps), "--warmup", "1" if quick else "3",
            "--eval-batches", "2" if quick else "10", "--batch-size", str(BATCH), *workload]


def calls(result: dict) -> str:
    """How a JAX config's timed training steps were called: whole chunks, or one step per call."""
    lengths = result.get("chunk_lengths")
    if not lengths:
        return "the chunks"
    if lengths == [1]:
        return "calls of one step (a whole chunk would not fit the time budget)"
    return "chunks of " + " and ".join(map(str, lengths)) + " steps"


def fmt(value, spec: str, missing: str = "n/a", suffix: str = "") -> str:
    return missing if value is None else format(value, spec) + suffix


def build_table(results: list[dict], flops: float | None, gemm: float | None) -> str:
    torch_result = next((r for r in results if r.get("framework") == "torch" and "error" not in r), None)
    head = ("| config | device | steps timed | train img/s | eval img/s (b32) | eval img/s (b40) | train vs PyTorch "
            "| eval vs PyTorch | compile s | first step from start s | same, warm cache s | peak RSS GiB "
            "| s / SIGNS epoch "
            "| achieved GFLOP/s | of GEMM rate |")
    columns = head.count(" | ") + 1
    lines = [head, "|" + "---|" * columns]
    for r in results:
        if "error" in r:
            lines.append(f"| {r['config']} | failed: {r['error']} |" + " |" * (columns - 2))
            continue
        train_ips, eval_ips = r["train_images_per_second"], r["eval_images_per_second"]
        ratio_train = ratio_eval = None
        if torch_result:
            ratio_train = train_ips / torch_result["train_images_per_second"]
            ratio_eval = eval_ips / torch_result["eval_images_per_second"]
        achieved = flops * train_ips / BATCH / 1e9 if flops else None
        lines.append(
            f"| {r['config']} | {r.get('device', '')} | {r['train_steps']} | {train_ips:.1f} | {eval_ips:.1f} "
            f"| {r['eval40_images_per_second']:.1f} | {fmt(ratio_train, '.2f', suffix='x')} "
            f"| {fmt(ratio_eval, '.2f', suffix='x')} "
            f"| {fmt(r.get('compile_seconds'), '.1f', 'n/a (eager)')} "
            f"| {fmt(r.get('time_to_first_step_seconds'), '.1f')} "
            f"| {fmt(r.get('warm', {}).get('time_to_first_step_seconds'), '.1f')} "
            f"| {r['peak_rss_bytes'] / 2**30:.2f} | {STEPS_PER_EPOCH * BATCH / train_ips:.1f} "
            f"| {fmt(achieved, '.1f')} | {fmt(achieved / gemm if achieved and gemm else None, '.0%')} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true",
                        help="a smoke check: 2 measured steps, little warm-up; writes no results "
                             "unless --out is given")
    parser.add_argument("--only", default=",".join(GROUPS),
                        help=f"comma-separated subset of {','.join(GROUPS)} (or jax-xla, jax-gemm)")
    parser.add_argument("--steps", type=int, default=None, help="measured training steps per config "
                        "(default 20; 2 with --quick)")
    parser.add_argument("--precision", default="highest", choices=("highest", "high", "default"),
                        help="the model's matmul/conv precision (config.matmul_precision); 'default' "
                             "lets a GPU use TensorFloat-32")
    parser.add_argument("--model", default=DEFAULT_WORKLOAD["model"], choices=MODELS,
                        help="the assignment's ResNet-50, or torchvision's ResNet-50 or ResNet-18 layout")
    parser.add_argument("--image-size", type=int, default=DEFAULT_WORKLOAD["image_size"])
    parser.add_argument("--batch", type=int, default=DEFAULT_WORKLOAD["batch"])
    parser.add_argument("--out", default=None,
                        help="output path without suffix (default experiments/throughput, or "
                             "experiments/throughput_MODEL_SIZEpx_bBATCH for another workload; none with --quick)")
    parser.add_argument("--render", metavar="JSON",
                        help="rewrite the report (the .md beside it) from a run's .json; measures nothing")
    # Worker mode (internal).
    parser.add_argument("--worker", choices=("machine", "jax"), help=argparse.SUPPRESS)
    parser.add_argument("--impl", choices=IMPLS, help=argparse.SUPPRESS)
    parser.add_argument("--warmup-chunks", type=int, default=2, help=argparse.SUPPRESS)
    parser.add_argument("--eval-images", type=int, default=320, help=argparse.SUPPRESS)
    parser.add_argument("--gemm-reps", type=int, default=10, help=argparse.SUPPRESS)
    parser.add_argument("--budget-s", type=float, default=60.0, help=argparse.SUPPRESS)
    parser.add_argument("--t0", type=float, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--result-file", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--cache-dir", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--first-step-only", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    set_workload(args.model, args.image_size, args.batch)

    if args.worker:
        args.t0 = args.t0 if args.t0 is not None else time.time()
        if args.steps is None:
            args.steps = 2 if args.quick else 20
        result = worker_machine(args) if args.worker == "machine" else worker_jax(args)
        Path(args.result_file).write_text(json.dumps(result, indent=1))
        return 0

    if args.render:
        path = Path(args.render)
        payload = json.loads(path.read_text())
        # The FLOP count is a function of the workload alone: counted again, as this code counts it.
        set_workload(**payload.get("workload", DEFAULT_WORKLOAD))
        payload["machine"].update(direct_conv_flops())
        rendered_by = " ".join(["python", "experiments/throughput.py", *(argv if argv is not None else sys.argv[1:])])
        md, text, derived = render(payload, rendered_by=rendered_by)
        payload.update(derived)
        print(text)
        path.with_suffix(".md").write_text(md)
        path.write_text(json.dumps(payload, indent=1))
        print(f"wrote {path.with_suffix('.md')} and {path}", file=sys.stderr)
        return 0

    command = " ".join(["python", "experiments/throughput.py", *(argv if argv is not None else sys.argv[1:])])
    steps = args.steps or (2 if args.quick else 20)
    wanted = {w.strip() for w in args.only.split(",") if w.strip()}
    unknown = wanted - set(GROUPS) - {f"jax-{i}" for i in IMPLS}
    if unknown:
        parser.error(f"--only: unknown {sorted(unknown)}; expected some of {GROUPS}, jax-xla, jax-gemm")
    impls = [i for i in IMPLS if "jax" in wanted or f"jax-{i}" in wanted]
    default_out = HERE / ("throughput" if is_default_workload() else f"throughput_{MODEL}_{IMAGE_SIZE}px_b{BATCH}")
    out = Path(args.out) if args.out else (None if args.quick else default_out)
    quick = ["--quick"] if args.quick else []

    started = datetime.datetime.now(datetime.timezone.utc)
    load_before = load_average()
    print(f"load average before: {load_before}", file=sys.stderr, flush=True)
    info = machine_info()
    machine = run_worker("machine", [__file__, "--worker", "machine", *workload_argv(), *quick])
    backend = machine.get("backend", "cpu")

    results = []
    for impl in impls:
        with tempfile.TemporaryDirectory() as cache:
            tuning_s = run_tuning(cache) if impl == "tuned" else None
            result = run_worker(f"jax-{impl}", jax_worker_argv(impl, args.precision, cache, steps, args.quick))
            result["tuning_seconds"] = tuning_s
            if "error" not in result:
                result["warm"] = run_worker(f"jax-{impl}-warm", jax_worker_argv(
                    impl, args.precision, cache, steps, first_step_only=True))
        results.append(result)
    skipped = []
    if "torch" in wanted:
        if backend != "cpu":
            skipped.append(f"pytorch: this torch build is CPU-only and JAX runs on {backend}")
        else:
            results.append(run_worker("pytorch", peer_worker_argv("torch_resnet50.py", steps, args.quick)))
    if "keras" in wanted and not is_default_workload():
        skipped.append("keras: its peer is the assignment's model at 64x64, batch 32 only")
    elif "keras" in wanted:
        results.append(run_worker("keras", peer_worker_argv("keras_resnet50.py", steps, args.quick),
                                  env_extra={"KERAS_BACKEND": "jax"}))
    load_after = load_average()
    finished = datetime.datetime.now(datetime.timezone.utc)

    payload = {"command": command, "workload": {"model": MODEL, "image_size": IMAGE_SIZE, "batch": BATCH},
               "started": started.isoformat(), "finished": finished.isoformat(),
               "load_average_before": load_before, "load_average_after": load_after,
               "steps_requested": steps, "machine": {**info, **machine}, "results": results,
               "skipped": skipped}
    md, text, derived = render(payload)
    payload.update(derived)
    print(text)
    if out:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.with_suffix(".md").write_text(md)
        out.with_suffix(".json").write_text(json.dumps(payload, indent=1))
        print(f"wrote {out.with_suffix('.md')} and {out.with_suffix('.json')}", file=sys.stderr)
    return 0 if all("error" not in r for r in results) and "error" not in machine else 1


def render(payload: dict, rendered_by: str | None = None) -> tuple[str, str, dict]:
    """The Markdown report, the console text and the derived numbers of a run's results."""
    set_workload(**payload.get("workload", DEFAULT_WORKLOAD))
    results, machine, skipped = payload["results"], payload["machine"], payload.get("skipped", [])
    backend = machine.get("backend", "cpu")
    jax_ok = [r for r in results if r.get("framework") == "jax" and "error" not in r]
    torch_result = next((r for r in results if r.get("framework") == "torch" and "error" not in r), None)
    # FLOPs per training step: the direct convolutions' (every tap; the same work for every config),
    # where the run counted them, else XLA's count for the 'xla' conv, else any.
    by_impl = {r["conv_impl"]: r for r in jax_ok}
    source = by_impl.get("xla") or (jax_ok[0] if jax_ok else None)
    by_hand = analytic_flops(BATCH, IMAGE_SIZE) if MODEL == "resnet50" else None
    flops = (machine.get("conv_flops_train") or (source or {}).get("flops_per_train_step_xla")
             or (by_hand or {}).get("train"))
    # The matmul floor: the best float32 jnp.dot rate seen in the run (the driver's own measurement
    # and the one each JAX-based config takes in its process): on a shared machine any single
    # measurement may have been slowed by other processes, the best one least.
    jnp_rates = {"driver": machine.get("gemm_gflops_best")}
    jnp_rates.update({r["config"]: r.get("gemm_gflops") for r in results
                      if r.get("framework") in ("jax", "keras") and "error" not in r})
    jnp_rates = {k: v for k, v in jnp_rates.items() if v}
    gemm = max(jnp_rates.values(), default=None)
    steps = payload.get("steps_requested") or max((r.get("train_steps", 0) for r in results), default=0)
    started = datetime.datetime.fromisoformat(payload["started"])
    finished = datetime.datetime.fromisoformat(payload["finished"])

    table = build_table(results, flops, gemm)
    # Runs before config.matmul_precision existed used JAX's default precision.
    precisions = " / ".join(sorted({repr(r.get("precision", "default")) for r in jax_ok})) or "n/a"
    notes = [
        f"- Load average (1, 5, 15 min) before: {payload['load_average_before']}; after: "
        f"{payload['load_average_after']}. The machine is shared: other processes may have taken CPU "
        f"time during the run, so treat differences of a few tens of percent with care.",
        f"- Matmul floor: {machine.get('gemm_n', 2048)}^3 float32 `jnp.dot` on {backend}, best of "
        f"the run: {fmt(gemm, '.1f')} GFLOP/s ("
        + ", ".join(f"{k} {v:.0f}" for k, v in jnp_rates.items()) + " GFLOP/s measured; the driver's "
        f"median {fmt(machine.get('gemm_gflops_median'), '.0f')})"
        + (f"; `torch.mm` in the PyTorch process: {torch_result['gemm_gflops']:.1f} GFLOP/s"
           if torch_result else "") + ".",
        f"- FLOPs per training step (batch {BATCH}): "
        + ", ".join(f"XLA cost analysis ({r['conv_impl']}) {r['flops_per_train_step_xla'] / 1e9:.1f} G"
                    for r in jax_ok if r.get("flops_per_train_step_xla"))
        + (f", PyTorch's FlopCounterMode {torch_result['flops_per_train_step_torch_counter'] / 1e9:.1f} G"
           if torch_result and torch_result.get("flops_per_train_step_torch_counter") else "")
        + (f"; the direct convolutions, every tap, {machine['conv_flops_train'] / 1e9:.1f} G (the "
           "work 'achieved GFLOP/s' counts)" if machine.get("conv_flops_train") else "")
        + (f"; by hand (convs + dense, 2 per MAC) {by_hand['train'] / 1e9:.1f} G, or "
           f"{by_hand['train_on_image'] / 1e9:.1f} G without the 3x3 taps that fall on the 'same' zero "
           f"padding (XLA's cost analysis does not count those, and adds the elementwise ops). Forward "
           f"pass of a batch of {BATCH}: by hand {by_hand['forward'] / 1e9:.1f} G "
           f"({by_hand['forward_on_image'] / 1e9:.1f} G on the image)" if by_hand else "")
        + "".join(f", XLA ({r['conv_impl']}) {r['flops_per_eval_batch_xla'] / 1e9:.1f} G"
                  for r in jax_ok if r.get("flops_per_eval_batch_xla")) + ".",
        f"- achieved GFLOP/s = {flops / 1e9:.1f} GFLOP per step x steps/s (the same work for every "
        f"config); 'of GEMM rate' divides it by the matmul floor above.",
        f"- s / SIGNS epoch = {STEPS_PER_EPOCH} steps x {BATCH} / train img/s (1080 images, the last batch "
        f"padded). Train img/s is steady state after warm-up: {steps} timed steps, or as many as fit "
        f"in the time budget where steps are very slow (column 'steps timed'; the budget is a minute "
        f"at 64x64, {train_budget_s()} s here); JAX runs an epoch's chunks as "
        f"the real run does, whole chunks of up to {(source or {}).get('steps_per_chunk', 2)} steps per "
        f"compiled call (one step per call where even one chunk would not fit the budget; each "
        f"config's note says which). Eval b32: "
        f"128 images in 4 batches per call; b40: SIGNS's 120 test images in 3.",
        "- compile s: cold trace, export and compilation of the training chunk, in the thread "
        "`train.start_training` runs beside the state's initialisation (JAX); Keras: its "
        "first `train_on_batch` (trace + compile + one step) less one steady step. First step from "
        "start: process launch (interpreter, imports, data, init, compile) to the end of the first "
        "training step. Peak RSS: `ru_maxrss` of the config's own subprocess.",
        "- same, warm cache: JAX only; a second process of the same config, started after the first "
        "had filled a fresh cache (XLA's executables and the exported programs: a second "
        "`resnet_flax.main` run finds both), to the end of its first training step"
        + "".join(f"; {r['config']}: compile {r['warm']['compile_seconds']:.1f} s"
                  for r in jax_ok if "compile_seconds" in r.get("warm", {})) + ".",
    ]
    for r in jax_ok:
        if r.get("tuning_seconds"):
            notes.append(f"- jax tuned: `python -m resnet_flax.autotune` for this workload took {r['tuning_seconds']:.0f} s "
                         "before its worker started (once per machine; the worker's cold start does not include it).")
        scanned = BATCH / r["train_images_per_second"]
        notes.append(
            f"- jax {r['conv_impl']}: {scanned:.2f} s per step in {calls(r)} vs "
            f"{r['single_step_seconds']:.2f} s for the same step jitted alone (no scan, "
            f"{r['single_step_reps']} timed); eval compile {r['eval']['32']['compile_seconds']:.1f} s "
            f"(b32); single-step compile {r['single_step_compile_seconds']:.1f} s; data: {r['data_path']}.")
    per_config = "; ".join(
        f"{r['config']}: load {r['load_average_start'].split()[0]} -> {r['load_average_end'].split()[0]}, "
        f"{r['process_seconds']:.0f} s" + (f", GEMM {r['gemm_gflops']:.0f} GFLOP/s" if r.get("gemm_gflops") else "")
        for r in results if "error" not in r)
    notes.append(f"- Per config (1-min load average at its start -> end, subprocess wall time, the matmul "
                 f"rate it measured itself: `jnp.dot`, or `torch.mm` for PyTorch): {per_config}.")
    notes += [f"- skipped {s}" for s in skipped]
    machine_lines = [
        f"- CPU: {machine['cpu']}, {machine['cores']} cores usable ({machine['cpu_count']} online), "
        f"{fmt(machine['memory_gib'], '.0f')} GiB RAM",
        f"- JAX backend: {backend} ({machine.get('device_kind', '?')}, {machine.get('device_count', '?')} device(s))",
        "- " + ", ".join(f"{k} {v}" for k, v in machine["versions"].items() if v) + f", Python {machine['python']}",
        f"- {machine['platform']}" + (f"; XLA_FLAGS={machine['xla_flags']}" if machine["xla_flags"] else ""),
        f"- Memory allocator (all configs): {machine.get('allocator', 'not recorded')}",
    ]
    md = "\n".join([
        f"# {MODEL} training throughput at {IMAGE_SIZE}x{IMAGE_SIZE}, batch {BATCH}: this project vs PyTorch"
        + (" and Keras" if is_default_workload() else ""),
        "",
        f"{MODEL_DESCRIPTIONS[MODEL]}, batch {BATCH}, {IMAGE_SIZE}x{IMAGE_SIZE}x3, float32 (JAX conv/matmul precision "
        f"{precisions}), random uint8 images, 1080 a training pass. "
        f"Run {started:%Y-%m-%d %H:%M} - {finished:%H:%M} UTC with:",
        "",
        "```bash",
        payload["command"],
        "```",
        *(["", f"This report was rendered again from the run's JSON with `{rendered_by}`."]
          if rendered_by else []),
        "",
        table,
        "",
        *notes,
        "",
        "## Machine",
        "",
        *machine_lines,
        "",
    ])
    text = "\n".join(["", table, "", *notes, "", *machine_lines])
    return md, text, {"flops_per_train_step": flops, "flops_analytic": by_hand, "gemm_floor_gflops": gemm}


if __name__ == "__main__":
    sys.exit(main())
