"""Seconds per training step against the number of steps per compiled call.

One training chunk of the 'gemm' (or ``--impl winograd``) ResNet-50 (batch 32), compiled once for
16 batches as ``train_and_evaluate`` compiles it, run with 1, 2, 4, 8 and 16 steps per call in
turns (so a change of machine speed hits every length alike). Also counts the minor page faults
per call: XLA:CPU maps its scratch memory afresh for each call. Then the same for evaluation
(``evaluation.evaluation_program``, one program per batch count: 1, 4 and 16 batches of 32 per
call).

    python experiments/chunk_length.py        # ~2.5 minutes; writes experiments/chunk_length.md
    python experiments/chunk_length.py --impl winograd --out /tmp/chunk_length_winograd.md
"""

import argparse
import datetime
import os
import platform
import resource
import time
from pathlib import Path

import jax
import numpy as np

from resnet_flax import config as config_lib
from resnet_flax import checkpoints, evaluation, feeds, input_pipeline, models, program_cache, runtime, train

HERE = Path(__file__).resolve().parent
LENGTHS = (1, 2, 4, 8, 16)
EVAL_BATCHES = (1, 4, 16)


def time_calls(call, repeats: int) -> tuple[float, float]:
    """Seconds and minor page faults per call of ``call()``, which waits for its results."""
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    start = time.perf_counter()
    for _ in range(repeats):
        call()
    seconds = (time.perf_counter() - start) / repeats
    return seconds, (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / repeats


def allocator() -> str:
    """The allocator settings this process runs with (the per-call cost depends on them)."""
    settings = [f"{k}={os.environ[k]}" for k in ("LD_PRELOAD", "MALLOC_CONF", "GLIBC_TUNABLES")
                if os.environ.get(k)]
    return " ".join(settings) or "the C library's malloc, default settings"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3, help="turns over all lengths")
    parser.add_argument("--out", default=str(HERE / "chunk_length.md"))
    parser.add_argument("--impl", default="gemm", choices=("gemm", "winograd"),
                        help="conv_impl ('gemm', the default, as in chunk_length.md's recorded runs)")
    args = parser.parse_args()

    config = config_lib.default_config()
    config.conv_impl = args.impl
    capacity = config.steps_per_chunk
    mesh = runtime.make_mesh()
    model = models.model_from_config(config)
    state, train_chunk, _ = train.start_training(config, model, 34, capacity, mesh,
                                                  program_cache.for_config(config, None))
    rng = np.random.default_rng(0)
    split = input_pipeline.Split(rng.integers(0, 256, (1080, 64, 64, 3), dtype=np.uint8),
                                 rng.integers(0, 6, 1080).astype(np.int32), "random uint8")
    indices, mask = input_pipeline.batch_indices(input_pipeline.epoch_order(0, 1, 1080), 32)
    calls = {n: feeds.gather_chunk(split, indices, mask, 0, n, capacity, mesh) for n in LENGTHS}
    state, sums = train_chunk(state, *calls[1])  # warm-up
    jax.block_until_ready(sums)

    seconds = {n: [] for n in LENGTHS}
    faults = {n: [] for n in LENGTHS}
    started = datetime.datetime.now(datetime.timezone.utc)

    def run_chunk(n):
        nonlocal state
        state, sums = train_chunk(state, *calls[n])
        jax.block_until_ready(sums)

    for _ in range(args.rounds):
        for n in LENGTHS:  # about 16 steps per length and round
            per_call, faults_per_call = time_calls(lambda: run_chunk(n), max(1, 16 // n))
            seconds[n].append(per_call / n)
            faults[n].append(faults_per_call)

    variables = checkpoints.split_state(state)[0]
    evaluate = evaluation.evaluation_program(model.apply, config.num_classes)
    eval_programs = {}
    for n in EVAL_BATCHES:
        batches = runtime.gather_batches(split.images, split.labels, indices[:n], mask[:n], mesh)
        eval_programs[n] = (evaluate.lower(variables, batches).compile(), batches)
        jax.block_until_ready(eval_programs[n][0](variables, batches))
    eval_seconds = {n: [] for n in EVAL_BATCHES}
    eval_faults = {n: [] for n in EVAL_BATCHES}
    for _ in range(args.rounds):
        for n, (program, batches) in eval_programs.items():
            per_call, faults_per_call = time_calls(
                lambda: jax.block_until_ready(program(variables, batches)), max(1, 32 // n))
            eval_seconds[n].append(per_call / n)
            eval_faults[n].append(faults_per_call)

    best16 = min(seconds[16])
    lines = [
        "# Seconds per training step against steps per compiled call", "",
        f"`python experiments/chunk_length.py --impl {args.impl}`, {started:%Y-%m-%d %H:%M} UTC, 2 cores, "
        f"jax {jax.__version__}, "
        f"load average after {' '.join(f'{x:.2f}' for x in os.getloadavg())}. '{args.impl}' ResNet-50, batch 32, "
        f"one program compiled for {capacity} batches; {args.rounds} rounds over the lengths, about 16 "
        f"steps per length and round.", "",
        "| steps per call | s per step (best / median of rounds) | vs 16 per call | minor page faults per call |",
        "|---|---|---|---|",
    ]
    for n in LENGTHS:
        ts = sorted(seconds[n])
        lines.append(f"| {n} | {ts[0]:.3f} / {ts[len(ts) // 2]:.3f} | {ts[0] / best16:.2f}x | "
                     f"{np.median(faults[n]):,.0f} |")
    per_call = (min(seconds[1]) - best16)
    lines += ["", f"Each call costs about {per_call * 1000:.0f} ms beyond its steps (best of 1 per call less "
              f"best of 16 per call).", "",
              "Evaluation (`evaluation.evaluation_program`, one program per batch count, batches of 32):", "",
              "| batches per call | s per batch (best / median of rounds) | img/s (best) | minor page faults per call |",
              "|---|---|---|---|"]
    for n in EVAL_BATCHES:
        ts = sorted(eval_seconds[n])
        lines.append(f"| {n} | {ts[0]:.4f} / {ts[len(ts) // 2]:.4f} | {32 / ts[0]:.0f} | "
                     f"{np.median(eval_faults[n]):,.0f} |")
    eval_per_call = min(eval_seconds[1]) - min(eval_seconds[max(EVAL_BATCHES)])
    lines += ["", f"An evaluation call costs about {eval_per_call * 1000:.0f} ms beyond its batches. "
              f"Machine: {platform.processor() or platform.machine()}, "
              f"{os.cpu_count()} cores, Python {platform.python_version()}. Memory allocator: {allocator()}."]
    Path(args.out).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
