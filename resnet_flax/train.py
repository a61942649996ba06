"""The training loop: epochs as a few compiled chunks of steps, evaluation after each, checkpoints,
metrics, and the run's summary (``train_and_evaluate``).

An epoch is a few compiled calls (``steps.make_train_chunk``): each runs a chunk of up to
``config.steps_per_chunk`` steps, and the progress bar moves between chunks. While the device runs
one chunk, the host gathers (or decodes: ``feeds.py``) the next chunk's batches, each process only
the rows its devices hold, and waits only for the previous chunk's sums.

Checkpoints come after epochs and, every ``config.checkpoint_every_steps`` steps, within them
(calls end at those steps). SIGTERM or SIGINT stops the run before its next call with a checkpoint
at the step reached (``preemption.py``); rerunning the same command resumes at the next batch, and
the run ends as an uninterrupted one would have, bit for bit.

Start-up (``start_training``) builds the train state and compiles the training chunk side by
side, from the programs an earlier run of the same config saved when there are any
(``resnet_flax/program_cache.py``); evaluation compiles when it is first needed.
"""

import concurrent.futures
import math
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from resnet_flax import config as config_lib
from resnet_flax import (autotune, checkpoints, datasets, evaluation, feeds, input_pipeline, metrics, models, preemption,
                         program_cache, recalibration, runtime, steps, warm_start)
from resnet_flax import workdir as workdir_lib
from resnet_flax.errors import UserError
from resnet_flax.summary import totals_line


class TrainingDiverged(UserError):
    """The loss became NaN or infinite."""


def chunk_lengths(num_steps: int, limit: int, first: int | None = None) -> list[int]:
    """How an epoch of ``num_steps`` steps splits into compiled calls of at most ``limit`` steps:
    ``first`` steps alone if given (a quick first result), then near-equal chunks.

    Longer chunks are faster: each call costs XLA:CPU about 71 ms beyond its steps, for ResNet-50
    at batch 32: it maps its ~0.35 GB of scratch memory afresh and faults it in page by page
    (experiments/chunk_length.md)."""
    lengths = []
    if first:
        lengths.append(min(first, num_steps))
        num_steps -= lengths[0]
    if num_steps:
        count = -(-num_steps // limit)
        lengths += [num_steps // count + (i < num_steps % count) for i in range(count)]
    return lengths


def check_finite(totals: Mapping[str, float], epoch: int) -> None:
    """Stops the run when the training loss so far, or the parameters or BatchNorm statistics a
    chunk ended with, are not finite: before anything of the epoch is written."""
    loss = steps.summarize(totals)["loss"]
    broken = (f"the loss is {loss}" if not math.isfinite(loss) else
              "the parameters became non-finite (NaN or infinite)" if totals.get("nonfinite_params") else
              "BatchNorm's running statistics became non-finite (NaN or infinite)"
              if totals.get("nonfinite_batch_stats") else None)
    if broken:
        raise TrainingDiverged(f"training diverged: {broken} in epoch {epoch}; no checkpoint was written for "
                               f"it (try a lower config.learning_rate)")


def abstract_batches(num_steps: int, batch_size: int, image_size: int, mesh) -> dict[str, jax.ShapeDtypeStruct]:
    """The shapes of a chunk of batches, to compile for before any data is there."""
    sharding = runtime.along_batch(mesh)
    shape = (num_steps, batch_size)
    return {"image": jax.ShapeDtypeStruct((*shape, image_size, image_size, 3), jnp.uint8, sharding=sharding),
            "label": jax.ShapeDtypeStruct(shape, jnp.int32, sharding=sharding),
            "mask": jax.ShapeDtypeStruct(shape, jnp.bool_, sharding=sharding)}


def call_plan(steps_per_epoch: int, begin: int, limit: int, first: int | None, every: int, step: int
              ) -> tuple[list[int], set[int]]:
    """The calls (their lengths, ``chunk_lengths``) that train batches ``begin`` to the end of an
    epoch starting at training step ``step``, and which of them end at a multiple of ``every``
    steps (0: none) inside the epoch, where a step checkpoint is due."""
    remaining = steps_per_epoch - begin
    segments, done = [], 0
    while done < remaining:
        segment = min(every - (step + done) % every if every else remaining, remaining - done)
        segments.append(segment)
        done += segment
    lengths, save_after = [], set()
    for i, segment in enumerate(segments):
        lengths += chunk_lengths(segment, limit, first if i == 0 else None)
        if i < len(segments) - 1:
            save_after.add(len(lengths) - 1)
    return lengths, save_after


def train_epoch(train_chunk, state: steps.TrainState, feed, epoch: int, config, mesh, lengths: list[int],
                capacity: int, show_progress: bool, profile: tuple[int, Path] | None = None, begin: int = 0,
                totals: dict | None = None, save_after: set[int] = frozenset(), save=None,
                stop: preemption.StopRequests | None = None) -> tuple[steps.TrainState, dict, int, bool]:
    """Trains on batches ``begin`` onwards of the epoch's order (that of (seed, epoch)), in calls of
    ``lengths`` steps (``call_plan``) of a chunk compiled for ``capacity`` batches, from the
    epoch's sums so far ``totals``.

    The next chunk's batches are gathered on the host while the device runs the current one, and
    the host waits only for the previous chunk's sums (for the progress bar and the NaN check).
    After the calls in ``save_after`` it calls ``save(state, batches_done, totals)``. Before each
    call it asks ``stop``; when asked to stop it returns early. Returns the state, the sums, the
    batches of the epoch done and whether it stopped early. ``profile`` = (i, folder) writes a
    ``jax.profiler`` trace of the i-th call into the folder.
    """
    indices, mask = input_pipeline.batch_indices(
        input_pipeline.epoch_order(config.seed, epoch, len(feed)), config.batch_size)
    totals = {**dict.fromkeys((*steps.SUMMED, "nonfinite_params", "nonfinite_batch_stats"), 0.0), **(totals or {})}
    bar = metrics.progress_bar(len(feed), epoch, config.num_epochs, enabled=show_progress,
                               initial=int(totals["count"]))
    start, start_count = time.perf_counter(), totals["count"]

    def account(sums, length: int) -> None:
        sums = jax.device_get(sums)
        for name in steps.SUMMED:  # step by step, in order: the same totals however the epoch was split
            for value in sums[name][:length]:
                totals[name] += float(value)
        for name in ("nonfinite_params", "nonfinite_batch_stats"):
            totals[name] += float(sums[name])
        check_finite(totals, epoch)
        so_far = steps.summarize({name: totals[name] for name in steps.SUMMED})
        bar.update(so_far["count"] - bar.n)
        bar.set_postfix(loss=f"{so_far['loss']:.4f}", accuracy=f"{so_far['accuracy']:.4f}",
                        img_per_s=f"{(so_far['count'] - start_count) / (time.perf_counter() - start):.0f}")

    pending, done, stopped = None, begin, False
    chunks = feed.chunks(indices[begin:], mask[begin:], lengths, capacity, epoch, train=True)
    for call, (batches, length) in enumerate(chunks):
        if stop is not None and stop.requested():
            stopped = True
            break
        traced = profile is not None and call == profile[0]
        if traced:
            jax.block_until_ready(state)  # the trace holds this call's steps alone
            jax.profiler.start_trace(str(profile[1]), create_perfetto_trace=True)
        state, sums = train_chunk(state, batches, runtime.replicated_scalar(np.int32(length), mesh))
        if traced:
            jax.block_until_ready((state, sums))
            jax.profiler.stop_trace()
        if pending is not None:
            account(*pending)
        pending, done = (sums, length), done + length
        if call in save_after:
            account(*pending)
            pending = None
            save(state, done, {name: totals[name] for name in steps.SUMMED})
    chunks.close()
    if pending is not None:
        account(*pending)
    bar.close()
    feed.report_skipped(f"epoch {epoch}")
    return state, totals, done, stopped


def recalibrate_batch_stats(model, variables, feed, config) -> dict:
    """``variables`` with BatchNorm statistics averaged over ``config.bn_recalibration_batches``
    training batches (a fixed order of its own: "epoch 0")."""
    indices, mask = input_pipeline.batch_indices(
        input_pipeline.epoch_order(config.seed, 0, len(feed)), config.batch_size)
    count = min(config.bn_recalibration_batches, len(indices))
    batches, _ = next(iter(feed.chunks(indices[:count], mask[:count], [count], count, epoch=0, train=True)))
    return recalibration.make_recalibrate(model.apply, models.batchnorm_momentum(config),
                                          config.normalization)(variables, batches)


def _timed(fn, *args, **kwargs):
    start = time.perf_counter()
    return fn(*args, **kwargs), time.perf_counter() - start


def start_training(config, model, steps_per_epoch: int, chunk: int, mesh, programs):
    """A fresh train state and the training chunk compiled for up to ``chunk`` steps per call;
    returns both and the seconds the compilation took.

    The chunk compiles in a second thread while the state is initialised: both are mostly XLA's
    work, which runs without the GIL (about 0.6 s sooner to the first step on a warm start).
    """
    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
        compiling = pool.submit(_timed, steps.compile_train_chunk, config,
                                steps.abstract_train_state(config, model, steps_per_epoch, mesh, programs),
                                abstract_batches(chunk, config.batch_size, config.image_size, mesh),
                                steps_per_epoch, programs)
        state = steps.create_train_state(config, model, steps_per_epoch, mesh, programs)
        train_chunk, compile_seconds = compiling.result()
    return state, train_chunk, compile_seconds


def describe_model(config) -> str:
    """``resnet50 (assignment layout, winograd conv, float32)``."""
    return f"{config.model} ({config.variant} layout, {models.resolved_conv_impl(config)} conv, {config.dtype})"


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str | Path, mesh=None,
                       verbose: bool = False) -> dict[str, Any]:
    """Trains ``config.model`` on ``config.dataset``, evaluating after every epoch; returns the summary.

    Resumes from ``workdir``'s checkpoints if it has any (with the same config, less the fields
    ``resnet_flax/workdir.py`` lets change). Writes ``config.json``, ``history.jsonl``,
    ``metrics.jsonl``, ``summary.json``, ``curves.png``, TensorBoard events and checkpoints into
    ``workdir``, which no other run may use meanwhile. ``mesh`` defaults to all devices of all
    processes. SIGTERM or SIGINT (in the main thread) stops it with a checkpoint and raises
    ``preemption.Preempted``. ``verbose`` prints each convolution's kernel (``resnet_flax.autotune``).
    """
    workdir = workdir_lib.prepare(workdir)
    with workdir_lib.Lock(workdir, enabled=jax.process_index() == 0), preemption.StopRequests() as stop:
        return _train_and_evaluate(config, workdir, mesh, stop, verbose)


def _train_and_evaluate(config: ml_collections.ConfigDict, workdir: Path, mesh, stop, verbose: bool
                        ) -> dict[str, Any]:
    is_main_process = jax.process_index() == 0
    sources = datasets.open_sources(config)
    config = datasets.with_num_classes(config, sources)
    changes = workdir_lib.check_resumed_config(workdir, config.to_dict(), config_lib.default_config().to_dict())
    compilation_cache = runtime.enable_compilation_cache(config.compilation_cache_dir)
    config_lib.validate(config, len(sources.train))
    mesh = runtime.make_mesh() if mesh is None else mesh
    runtime.check_divisible(config.batch_size, mesh, "batch_size")
    runtime.check_divisible(config.eval_batch_size, mesh, "eval_batch_size")
    train_feed, test_feed = (feeds.make_feed(source, config, mesh) for source in (sources.train, sources.test))
    dataset_record = {"class_names": sources.class_names, "train": train_feed.description,
                      "test": test_feed.description}
    # The kernel of each convolution: the run's own on a resume, else as measured on this machine.
    conv_plan, conv_kernels = autotune.plan_for_run(
        config, models.model_from_config(config), workdir, autotune.has_saved_state(workdir), compilation_cache,
        list_kernels=verbose)
    model = models.model_from_config(config, conv_plan=conv_plan)
    eval_model = models.model_from_config(config, conv_plan=conv_plan.in_mode("eval")) if conv_plan else model
    programs = program_cache.for_config(config, compilation_cache, conv_plan)
    num_train = len(train_feed)
    steps_per_epoch = -(-num_train // config.batch_size)
    capacity = min(config.steps_per_chunk, steps_per_epoch)  # batches per compiled call, at most

    state, train_chunk, compile_seconds = start_training(config, model, steps_per_epoch, capacity, mesh,
                                                         programs)
    checkpointer = checkpoints.Checkpointer(workdir, keep=config.keep_checkpoints)
    step_checkpointer = checkpoints.Checkpointer(workdir, keep=2, folder=checkpoints.STEP_CHECKPOINT_DIR)
    state, position = warm_start.restore_run(state, config, [checkpointer, step_checkpointer], model.head_name)
    last_epoch = position["epoch"]
    # The newest checkpoint's (step, folder); a run stopped at another step saves one first.
    saved = (int(state.step), position["path"]) if "path" in position else (-1, None)
    test_set = evaluation.EvaluationBatches(test_feed, config.eval_batch_size, capacity, mesh)

    if is_main_process:
        workdir_lib.record_start(workdir, config.to_dict(), last_epoch, changes)
        print(f"number of training examples = {num_train}\nnumber of test examples = {len(test_feed)}\n"
              f"data: {train_feed.description}, {test_feed.description} ({sources.num_classes} classes)\n"
              f"model: {describe_model(config)}, {mesh.size} "
              f"{jax.default_backend()} device(s), {steps_per_epoch} steps of {config.batch_size} per epoch\n"
              f"{totals_line(checkpoints.split_state(state)[0])}")
        print(autotune.describe_plan(conv_kernels) if verbose else f"conv kernels: {conv_kernels['source']}",
              flush=True)

    # Compiled once per shape of the test chunks, when first needed (after the first epoch).
    evaluate = evaluation.Evaluator(eval_model.apply, config.num_classes, programs, config.normalization)

    def test_metrics():
        return evaluate.over(checkpoints.split_state(state)[0], test_set)

    def ema_test_metrics() -> dict:  # the moving average of the weights, where the run keeps one
        return evaluate.over(state.ema, test_set) if state.ema is not None else {}

    def save_within_epoch(state, epoch: int, batches_done: int, totals: dict) -> None:
        nonlocal saved
        checkpoints.save_state(step_checkpointer, int(state.step), state, config,
                               progress={"epoch": epoch - 1, "batch": batches_done, "seed": config.seed,
                                         "totals": totals}, dataset=dataset_record)
        saved = (int(state.step), step_checkpointer.root / str(int(state.step)))

    writer = metrics.MetricsWriter(workdir, enabled=is_main_process)
    records = writer.keep_epochs_before(last_epoch + 1)
    for epoch in range(last_epoch + 1, config.num_epochs + 1):
        epoch_start = time.perf_counter()
        first_epoch = epoch == last_epoch + 1
        begin = position["batch"] if first_epoch else 0
        carried = position.get("totals") if begin else None  # the epoch's sums before the resume
        # This process's first epoch starts with one step alone: its result (or error) shows at once.
        lengths, save_after = call_plan(steps_per_epoch, begin, capacity, 1 if first_epoch else None,
                                        config.checkpoint_every_steps, int(state.step))
        profile = None
        if config.profile_steps and first_epoch and not begin:
            # After that step (compiled, warm): a call of profile_steps steps, traced by process 0.
            # Every process makes the same calls, as a sharded program needs.
            lengths = [1, *chunk_lengths(steps_per_epoch - 1, capacity, first=config.profile_steps)]
            save_after, profile = set(), ((1, workdir / "profile") if is_main_process else None)
        state, totals, done, stopped = train_epoch(
            train_chunk, state, train_feed, epoch, config, mesh, lengths, capacity,
            show_progress=is_main_process, profile=profile, begin=begin,
            totals=carried, save_after=save_after,
            save=lambda state, done, totals: save_within_epoch(state, epoch, done, totals), stop=stop)
        if stopped:
            if int(state.step) != saved[0]:
                save_within_epoch(state, epoch, done, {name: totals[name] for name in steps.SUMMED})
            writer.close()
            raise preemption.Preempted(
                f"stopped by {stop.name} at step {int(state.step)} (epoch {epoch}, {done} of {steps_per_epoch} "
                f"batches done); checkpoint {saved[1]}; rerun the same command to resume", stop.stopping_signal)
        train = steps.summarize({name: totals[name] for name in steps.SUMMED})
        if profile is not None:
            print(f"profile of {config.profile_steps} steps: {profile[1]} (tensorboard --logdir={profile[1]}, "
                  "or perfetto_trace.json.gz in ui.perfetto.dev)", flush=True)
        seconds = time.perf_counter() - epoch_start
        test = test_metrics()
        if not math.isfinite(test["loss"]):
            raise TrainingDiverged(f"training diverged: the test loss is {test['loss']} after epoch {epoch} (the "
                                   f"weights give non-finite outputs in inference mode); no checkpoint was "
                                   f"written for it (try a lower config.learning_rate)")
        trained_here = num_train - int(carried["count"]) if carried else num_train
        record = {"epoch": epoch, "train_loss": train["loss"], "train_accuracy": train["accuracy"],
                  "test_loss": test["loss"], "test_accuracy": test["accuracy"],
                  "seconds": seconds, "images_per_second": trained_here / seconds}
        ema_test = ema_test_metrics()
        if ema_test:
            record.update(ema_test_loss=ema_test["loss"], ema_test_accuracy=ema_test["accuracy"])
        records.append(record)
        writer.write_epoch(record, step=int(state.step))
        if is_main_process:
            print(metrics.keras_line(record, config.num_epochs, steps_per_epoch), flush=True)
        if epoch % config.checkpoint_every_epochs == 0 or epoch == config.num_epochs:
            checkpoints.save_state(checkpointer, epoch, state, config, dataset=dataset_record)
            saved = (int(state.step), checkpointer.root / str(epoch))
    writer.close()
    checkpointer.close()
    step_checkpointer.close()

    test = test_metrics()
    variables = checkpoints.split_state(state)[0]
    if config.bn_recalibration_batches:
        recalibrated = evaluate.over(recalibrate_batch_stats(model, variables, train_feed, config), test_set)
    last = records[-1] if records else {}
    epoch_seconds = [r["seconds"] for r in records]
    summary = {
        "test_loss": test["loss"],
        "test_accuracy": test["accuracy"],
    }
    if config.dataset == "signs":  # held in memory
        unseen = input_pipeline.unseen_test_examples(input_pipeline.Dataset(
            train_feed.split, test_feed.split, config.num_classes))
        unseen_test = evaluate(variables, evaluation.split_batches(
            test_feed.split, config.eval_batch_size, mesh, examples=unseen, num_batches=test_set.num_batches))
        summary.update(test_accuracy_unseen=unseen_test["accuracy"], test_examples_unseen=unseen_test["count"])
    summary.update({
        "train_loss": last.get("train_loss"),
        "train_accuracy": last.get("train_accuracy"),
        "epochs": len(records),
        "steps": int(state.step),
        "epoch_seconds": epoch_seconds,
        "compile_seconds": compile_seconds + evaluate.compile_seconds,
        "images_per_second": num_train * len(records) / sum(epoch_seconds) if records else None,
        "backend": jax.default_backend(),
        "device_count": mesh.size,
        "process_count": jax.process_count(),
        "model": config.model,
        "variant": config.variant,
        "dtype": config.dtype,
        "conv_impl": models.resolved_conv_impl(config),
        "conv_kernels": conv_kernels,
        "dataset": config.dataset,
        "class_names": sources.class_names,
    })
    ema_test = ema_test_metrics()
    if ema_test:
        summary.update(ema_test_loss=ema_test["loss"], ema_test_accuracy=ema_test["accuracy"])
    if config.bn_recalibration_batches:
        summary.update(bn_recalibration_batches=config.bn_recalibration_batches,
                       recalibrated_test_loss=recalibrated["loss"],
                       recalibrated_test_accuracy=recalibrated["accuracy"])
    if jax.process_count() > 1:
        print(f"process {jax.process_index()}: decoded {train_feed.decoded} training and {test_feed.decoded} "
              "test images", flush=True)
    if is_main_process:
        metrics.write_json(workdir / "summary.json", summary)
        if records:
            metrics.plot_curves(records, workdir / "curves.png", title=f"{config.model} on {config.dataset}")
        print(f"Test Loss = {test['loss']:.4f}\nTest Accuracy = {test['accuracy']:.4f}", flush=True)
        if ema_test:
            print(f"With the moving average of the weights (decay {config.ema_decay}): Test Loss = "
                  f"{ema_test['loss']:.4f}, Test Accuracy = {ema_test['accuracy']:.4f}", flush=True)
        if config.bn_recalibration_batches:
            print(f"With BatchNorm statistics re-estimated over {config.bn_recalibration_batches} training "
                  f"batches: Test Loss = {recalibrated['loss']:.4f}, Test Accuracy = "
                  f"{recalibrated['accuracy']:.4f}", flush=True)
    return summary
