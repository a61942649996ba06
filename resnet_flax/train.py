"""Training and evaluation: the train state, the compiled steps, and the loop that ties them.

An epoch is a few compiled calls: each runs a chunk of up to ``config.steps_per_chunk`` steps in
a loop on donated buffers, and the progress bar moves between chunks. While the device runs one
chunk, the host gathers the next chunk's batches (each process only the slice its devices hold; a
few MB) and waits only for the previous chunk's sums. The last, partial batch is padded and masked
(BatchNorm statistics and the loss ignore the padding), so every training example is used each
epoch and evaluation counts each test example exactly once.

Start-up (``start_training``) builds the train state and compiles the training chunk side by
side, from the programs an earlier run of the same config saved when there are any
(``resnet_flax/program_cache.py``); evaluation compiles when it is first needed.
"""

import concurrent.futures
import functools
import math
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax.training import train_state
from jax import lax

from resnet_flax import config as config_lib
from resnet_flax import (checkpoints, conv, input_pipeline, metrics, models, program_cache, recalibration,
                         runtime)
from resnet_flax.errors import UserError


class TrainState(train_state.TrainState):
    """Step, params, optimizer state, and BatchNorm's running statistics."""

    batch_stats: Any


class TrainingDiverged(UserError):
    """The loss became NaN or infinite."""


# ---------------------------------------------------------------------------------------------
# Set-up


def make_optimizer(config: ml_collections.ConfigDict, steps_per_epoch: int) -> optax.GradientTransformation:
    """Adam with Keras's defaults (lr 1e-3, b1 0.9, b2 0.999, eps 1e-7) unless the config says otherwise."""
    learning_rate = config.learning_rate
    if config.lr_schedule == "cosine":
        total = max(config.num_epochs * steps_per_epoch, 1)
        warmup = min(int(config.warmup_epochs * steps_per_epoch), total - 1)
        learning_rate = optax.warmup_cosine_decay_schedule(
            0.0, config.learning_rate, max(warmup, 1), total, end_value=0.0)
    adam = dict(b1=config.adam_b1, b2=config.adam_b2, eps=config.adam_eps)
    if config.weight_decay:
        return optax.adamw(learning_rate, weight_decay=config.weight_decay, **adam)
    return optax.adam(learning_rate, **adam)


def _initializer(config, model, steps_per_epoch: int, mesh, programs):
    """The exported ``model.init`` (variables, replicated) and ``variables -> TrainState``."""
    tx = make_optimizer(config, steps_per_epoch)

    def init_variables():
        dummy = jnp.zeros((1, config.image_size, config.image_size, 3), jnp.float32)
        return model.init(jax.random.key(config.seed), dummy, train=False)

    def create(variables) -> TrainState:
        return TrainState.create(apply_fn=model.apply, params=variables["params"],
                                 batch_stats=variables["batch_stats"], tx=tx)

    return programs.exported("init_variables", init_variables, out_shardings=runtime.replicated(mesh)), create


def create_train_state(config, model, steps_per_epoch: int, mesh=None,
                       programs: program_cache.ProgramCache | None = None) -> TrainState:
    """Fresh parameters from ``config.seed``, replicated over ``mesh`` (default: all devices).

    Built inside ``jit`` with replicated outputs, so every process of a multi-host run holds the
    same global arrays without copying them around. ``model.init`` goes through ``programs``
    (which must belong to this config and model; default: no cache), so a warm start does not
    trace it again.
    """
    mesh = runtime.make_mesh() if mesh is None else mesh
    programs = programs or program_cache.for_config(config, None)
    init, create = _initializer(config, model, steps_per_epoch, mesh, programs)
    replicated = runtime.replicated(mesh)
    variables = jax.jit(init.call, out_shardings=replicated)()
    return jax.jit(create, out_shardings=replicated)(variables)


def abstract_train_state(config, model, steps_per_epoch: int, mesh, programs) -> TrainState:
    """What ``create_train_state`` returns, as shapes: without running ``model.init``."""
    init, create = _initializer(config, model, steps_per_epoch, mesh, programs)
    replicated = runtime.replicated(mesh)
    variables = jax.tree.unflatten(
        init.out_tree, [jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=replicated) for a in init.out_avals])
    shapes = jax.eval_shape(create, variables)
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated), shapes)


# ---------------------------------------------------------------------------------------------
# Steps


def cross_entropy(logits, labels, num_classes: int, label_smoothing: float = 0.0):
    """Per-example softmax cross-entropy (the assignment's categorical_crossentropy)."""
    targets = jax.nn.one_hot(labels, num_classes)
    if label_smoothing:
        targets = optax.smooth_labels(targets, label_smoothing)
    return optax.softmax_cross_entropy(logits, targets)


def _sums(per_example_loss, logits, labels, mask) -> dict[str, jax.Array]:
    """Loss and hit sums over the real (unmasked) examples: they add up exactly across batches."""
    weight = mask.astype(jnp.float32)
    return {
        "loss_sum": jnp.sum(per_example_loss * weight),
        "correct": jnp.sum((jnp.argmax(logits, -1) == labels) * weight),
        "count": jnp.sum(weight),
    }


def train_step(state: TrainState, batch: Mapping[str, jax.Array], rng: jax.Array, *,
               num_classes: int, label_smoothing: float = 0.0, augment: bool = False):
    """One Adam step on a batch of uint8 images; returns the new state and the batch's sums."""
    images = input_pipeline.normalize(batch["image"])
    if augment:
        images = input_pipeline.augment(images, jax.random.fold_in(rng, state.step))
    labels, mask = batch["label"], batch["mask"]

    def loss_fn(params):
        logits, updates = state.apply_fn(
            {"params": params, "batch_stats": state.batch_stats},
            images, train=True, mask=mask, mutable=["batch_stats"])
        per_example = cross_entropy(logits, labels, num_classes, label_smoothing)
        loss = jnp.sum(per_example * mask) / jnp.maximum(jnp.sum(mask), 1)
        return loss, (per_example, logits, updates["batch_stats"])

    grads, (per_example, logits, batch_stats) = jax.grad(loss_fn, has_aux=True)(state.params)
    state = state.apply_gradients(grads=grads, batch_stats=batch_stats)
    return state, _sums(per_example, logits, labels, mask)


def eval_step(apply_fn, variables: Mapping, batch: Mapping[str, jax.Array], *, num_classes: int):
    """Inference-mode sums on a batch (running BatchNorm statistics, nothing updated)."""
    logits = apply_fn(variables, input_pipeline.normalize(batch["image"]), train=False)
    per_example = cross_entropy(logits, batch["label"], num_classes)
    return _sums(per_example, logits, batch["label"], batch["mask"])


def _scan_batches(step_fn, carry, batches):
    """Runs ``step_fn(carry, batch)`` over the leading (step) axis of ``batches`` and adds up the
    per-step sums."""
    carry, sums = lax.scan(step_fn, carry, batches)
    return carry, jax.tree.map(jnp.sum, sums)


def make_train_chunk(config):
    """``(state, batches, num_steps) -> (state, sums)``: the first ``num_steps`` batches of
    ``batches`` (arrays of shape (chunk, batch, ...)), all steps in one compiled call, the state's
    buffers donated; ``num_steps`` defaults to all of them. It is a traced value: one program runs
    chunks of any length up to the arrays' (an epoch's short first or last chunk included).
    Augmentation draws from ``config.seed`` folded with the step, so a resumed run repeats it
    exactly."""
    step = functools.partial(train_step, num_classes=config.num_classes,
                             label_smoothing=config.label_smoothing, augment=config.augment)

    def train_chunk(state, batches, num_steps):
        rng = jax.random.key(config.seed)

        def one_step(i, carry):
            state, totals = carry
            batch = jax.tree.map(lambda a: lax.dynamic_index_in_dim(a, i, keepdims=False), batches)
            state, sums = step(state, batch, rng)
            return state, jax.tree.map(jnp.add, totals, sums)

        zeros = dict.fromkeys(("loss_sum", "correct", "count"), jnp.zeros((), jnp.float32))
        return lax.fori_loop(0, num_steps, one_step, (state, zeros))

    compiled = jax.jit(train_chunk, donate_argnums=0)

    def run(state, batches, num_steps=None):
        if num_steps is None:
            num_steps = np.int32(len(batches["mask"]))
        return compiled(state, batches, num_steps)

    return run


def compile_train_chunk(config, state: TrainState, batches, steps_per_epoch: int,
                        programs: program_cache.ProgramCache | None = None):
    """``make_train_chunk(config)`` compiled for ``state`` and ``batches`` (arrays or
    ``ShapeDtypeStruct``s) through ``programs``: the same ``(state, batches, num_steps) -> (state,
    sums)``, ``num_steps`` a replicated int32 scalar (``runtime.replicated_scalar``)."""
    programs = programs or program_cache.for_config(config, None)
    treedef = jax.tree.structure(state)
    chunk = make_train_chunk(config)

    def flat_chunk(leaves, batches, num_steps):  # exported programs take plain lists, not a TrainState
        new_state, sums = chunk(jax.tree.unflatten(treedef, leaves), batches, num_steps)
        return jax.tree.leaves(new_state), sums

    sharding = batches["mask"].sharding
    num_steps = jax.ShapeDtypeStruct((), jnp.int32, sharding=runtime.replicated(sharding.mesh))
    compiled = programs.compile("train_chunk", flat_chunk, abstract(jax.tree.leaves(state)), batches,
                                num_steps, extra={"steps_per_epoch": steps_per_epoch}, donate_argnums=(0,))

    def train_chunk(state, batches, num_steps):
        leaves, sums = compiled(jax.tree.leaves(state), batches, num_steps)
        return jax.tree.unflatten(treedef, leaves), sums

    return train_chunk


def inference_kernels(apply_fn, variables: Mapping, images: jax.Array) -> dict:
    """``{conv.INFERENCE_KERNELS: ...}``: every kernel in the form evaluation multiplies by, where
    that differs from the kernel (``conv.inference_kernel``), derived by applying the model to the
    first of ``images`` (the rest of that forward pass is dead code, which XLA drops); ``{}`` where
    no layer has one."""
    _, derived = apply_fn(variables, input_pipeline.normalize(images[:1]), train=False,
                          mutable=[conv.INFERENCE_KERNELS])
    return dict(derived)


def evaluate_batches(apply_fn, num_classes: int):
    """``(variables, batches) -> (sums, kernels)``: the sums over all of ``batches``, to be compiled
    as one program, and the ``inference_kernels`` it derived first. Returning these makes them
    outputs with buffers of their own; otherwise XLA keeps them in its scratch buffer, which it maps
    afresh each call (one page fault per 4 KiB, ~18 ms a call for ResNet-50 on 2 cores)."""
    step = functools.partial(eval_step, apply_fn, num_classes=num_classes)

    def evaluate(variables, batches):
        kernels = inference_kernels(apply_fn, variables, batches["image"][0])
        sums = _scan_batches(lambda v, b: (v, step(v, b)), {**variables, **kernels}, batches)[1]
        return sums, kernels

    return evaluate


def evaluation_program(apply_fn, num_classes: int):
    """``evaluate_batches`` jitted with ``runtime.evaluation_compiler_options()`` (so it must not be
    called inside another jit)."""
    return jax.jit(evaluate_batches(apply_fn, num_classes), compiler_options=runtime.evaluation_compiler_options())


def make_evaluate(apply_fn, num_classes: int):
    """``(variables, batches) -> sums``: ``evaluation_program``'s sums."""
    program = evaluation_program(apply_fn, num_classes)
    return lambda variables, batches: program(variables, batches)[0]


def summarize(sums: Mapping[str, Any]) -> dict[str, float]:
    """Mean loss and accuracy from summed ones (NaN when no example was counted)."""
    sums = jax.device_get(sums)
    count = float(sums["count"])
    mean = (lambda total: float(total) / count) if count else (lambda total: math.nan)
    return {"loss": mean(sums["loss_sum"]), "accuracy": mean(sums["correct"]), "count": int(count)}


def chunk_lengths(steps: int, limit: int, first: int | None = None) -> list[int]:
    """How an epoch of ``steps`` steps splits into compiled calls of at most ``limit`` steps:
    ``first`` steps alone if given (a quick first result), then near-equal chunks.

    Longer chunks are faster: each call costs XLA:CPU about 85 ms beyond its steps (it maps
    and unmaps its ~0.5 GB of scratch memory per call, for ResNet-50 at batch 32).
    """
    lengths = []
    if first:
        lengths.append(min(first, steps))
        steps -= lengths[0]
    if steps:
        count = -(-steps // limit)
        lengths += [steps // count + (i < steps % count) for i in range(count)]
    return lengths


# ---------------------------------------------------------------------------------------------
# Checkpoints: a TrainState is saved as two orbax items, so weights can be read without the rest.


def split_state(state: TrainState) -> tuple[dict, dict]:
    variables = {"params": state.params, "batch_stats": state.batch_stats}
    return variables, {"opt_state": state.opt_state, "step": state.step}


def abstract(tree):
    """Shapes, dtypes and shardings: the target a checkpoint is restored into."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)


def save_checkpoint(checkpointer: checkpoints.Checkpointer, epoch: int, state: TrainState, config) -> None:
    variables, optimizer = split_state(state)
    checkpointer.save(epoch, variables, optimizer, config)


def restore_or_keep(state: TrainState, config, checkpointer: checkpoints.Checkpointer) -> tuple[TrainState, int]:
    """Resumes from the workdir's newest good checkpoint, else starts from ``config.restore_from``
    if set, else keeps the fresh ``state``. Returns the state and the last completed epoch."""
    variables, optimizer = (abstract(tree) for tree in split_state(state))
    restored = checkpointer.restore_latest(variables, optimizer)
    if restored is not None:
        variables, optimizer, epoch = restored
        print(f"Resuming from {checkpointer.root / str(epoch)} (epoch {epoch})", flush=True)
        return state.replace(**variables, **optimizer), epoch
    if config.restore_from:
        variables, optimizer = checkpoints.restore_variables(
            config.restore_from, variables, optimizer=optimizer if config.restore_optimizer else None)
        what = "weights and optimizer state" if config.restore_optimizer else "weights"
        print(f"Starting from the {what} of {config.restore_from}", flush=True)
        return state.replace(**variables, **(optimizer or {})), 0
    return state, 0


# ---------------------------------------------------------------------------------------------
# The loop


def _check_finite(sums: Mapping[str, float], epoch: int) -> None:
    if not math.isfinite(sums["loss"]):
        raise TrainingDiverged(
            f"training diverged: the loss is {sums['loss']} in epoch {epoch}; no checkpoint was "
            f"written for it (try a lower config.learning_rate)")


def abstract_batches(steps: int, batch_size: int, image_size: int, mesh) -> dict[str, jax.ShapeDtypeStruct]:
    """The shapes of a chunk of batches, to compile for before any data is there."""
    sharding = runtime.along_batch(mesh)
    shape = (steps, batch_size)
    return {"image": jax.ShapeDtypeStruct((*shape, image_size, image_size, 3), jnp.uint8, sharding=sharding),
            "label": jax.ShapeDtypeStruct(shape, jnp.int32, sharding=sharding),
            "mask": jax.ShapeDtypeStruct(shape, jnp.bool_, sharding=sharding)}


def gather_chunk(split: input_pipeline.Split, indices: np.ndarray, mask: np.ndarray, begin: int,
                 length: int, capacity: int, mesh) -> tuple[dict[str, jax.Array], jax.Array]:
    """The arguments of a training chunk compiled for ``capacity`` batches that runs the ``length``
    batches of ``indices``/``mask`` from ``begin``: the batches, and the number of steps."""
    # A short chunk fills the compiled shape with copies of its first batch that never run.
    rows = np.r_[begin:begin + length, np.full(capacity - length, begin)]
    batches = runtime.gather_batches(split.images, split.labels, indices[rows], mask[rows], mesh)
    return batches, runtime.replicated_scalar(np.int32(length), mesh)


def train_epoch(train_chunk, state: TrainState, split: input_pipeline.Split, epoch: int, config, mesh,
                lengths: list[int], capacity: int, show_progress: bool) -> tuple[TrainState, dict[str, float]]:
    """One pass over the training set in the order of (seed, epoch), in calls of ``lengths`` steps
    (``chunk_lengths``) of a chunk compiled for ``capacity`` batches.

    The next chunk's batches are gathered on the host while the device runs the current one, and
    the host waits only for the previous chunk's sums (for the progress bar and the NaN check).
    """
    indices, mask = input_pipeline.batch_indices(
        input_pipeline.epoch_order(config.seed, epoch, len(split)), config.batch_size)
    totals = {"loss_sum": 0.0, "correct": 0.0, "count": 0.0}
    bar = metrics.progress_bar(len(split), epoch, config.num_epochs, enabled=show_progress)
    start = time.perf_counter()

    def account(sums) -> None:
        for name, value in jax.device_get(sums).items():
            totals[name] += float(value)
        so_far = summarize(totals)
        _check_finite(so_far, epoch)
        bar.update(so_far["count"] - bar.n)
        bar.set_postfix(loss=f"{so_far['loss']:.4f}", accuracy=f"{so_far['accuracy']:.4f}",
                        img_per_s=f"{so_far['count'] / (time.perf_counter() - start):.0f}")

    pending, begin = None, 0
    for length in lengths:
        chunk_args = gather_chunk(split, indices, mask, begin, length, capacity, mesh)
        state, sums = train_chunk(state, *chunk_args)
        if pending is not None:
            account(pending)
        pending, begin = sums, begin + length
    account(pending)
    bar.close()
    return state, summarize(totals)


def recalibrate_batch_stats(model, variables, split: input_pipeline.Split, config, mesh) -> dict:
    """``variables`` with BatchNorm statistics averaged over ``config.bn_recalibration_batches``
    training batches (a fixed order of its own: "epoch 0")."""
    indices, mask = input_pipeline.batch_indices(
        input_pipeline.epoch_order(config.seed, 0, len(split)), config.batch_size)
    count = min(config.bn_recalibration_batches, len(indices))
    batches = runtime.gather_batches(split.images, split.labels, indices[:count], mask[:count], mesh)
    return recalibration.make_recalibrate(model.apply)(variables, batches)


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
        compiling = pool.submit(_timed, compile_train_chunk, config,
                                abstract_train_state(config, model, steps_per_epoch, mesh, programs),
                                abstract_batches(chunk, config.batch_size, config.image_size, mesh),
                                steps_per_epoch, programs)
        state = create_train_state(config, model, steps_per_epoch, mesh, programs)
        train_chunk, compile_seconds = compiling.result()
    return state, train_chunk, compile_seconds


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str | Path, mesh=None) -> dict[str, Any]:
    """Trains ``config.model`` on SIGNS, evaluating after every epoch; returns the summary.

    Resumes from ``workdir``'s checkpoints if it has any. Writes ``config.json``,
    ``metrics.jsonl``, ``summary.json``, ``curves.png``, TensorBoard events and checkpoints into
    ``workdir``. ``mesh`` defaults to all devices of all processes.
    """
    workdir = Path(workdir)
    is_main_process = jax.process_index() == 0
    programs = program_cache.for_config(config, runtime.enable_compilation_cache(config.compilation_cache_dir))
    dataset = input_pipeline.load_dataset(config)
    config_lib.validate(config, len(dataset.train))
    mesh = runtime.make_mesh() if mesh is None else mesh
    runtime.check_divisible(config.batch_size, mesh, "batch_size")
    runtime.check_divisible(config.eval_batch_size, mesh, "eval_batch_size")
    model = models.model_from_config(config)
    num_train = len(dataset.train)
    steps_per_epoch = -(-num_train // config.batch_size)
    capacity = min(config.steps_per_chunk, steps_per_epoch)  # batches per compiled call, at most

    state, train_chunk, compile_seconds = start_training(config, model, steps_per_epoch, capacity, mesh,
                                                         programs)
    checkpointer = checkpoints.Checkpointer(workdir, keep=config.keep_checkpoints)
    state, last_epoch = restore_or_keep(state, config, checkpointer)
    test_batches = runtime.gather_batches(
        dataset.test.images, dataset.test.labels,
        *input_pipeline.batch_indices(np.arange(len(dataset.test)), config.eval_batch_size), mesh)

    if is_main_process:
        workdir.mkdir(parents=True, exist_ok=True)
        metrics.write_json(workdir / "config.json", config.to_dict())
        print(f"number of training examples = {num_train}\nnumber of test examples = {len(dataset.test)}\n"
              f"data: {dataset.train.source}, {dataset.test.source}\n"
              f"model: {config.model} ({conv.resolve_impl(config.conv_impl)} conv), {mesh.size} "
              f"{jax.default_backend()} device(s), {steps_per_epoch} steps of {config.batch_size} per epoch")

    # Compiled once, for the shapes of the test set, when first needed (after the first epoch).
    @functools.cache
    def evaluate_program():
        nonlocal compile_seconds
        program, seconds = _timed(programs.compile, "evaluate", evaluate_batches(model.apply, config.num_classes),
                                  abstract(split_state(state)[0]), abstract(test_batches),
                                  compiler_options=runtime.evaluation_compiler_options())
        compile_seconds += seconds
        return program

    def evaluate(variables, batches):
        return evaluate_program()(variables, batches)[0]

    def test_metrics():
        return summarize(evaluate(split_state(state)[0], test_batches))

    writer = metrics.MetricsWriter(workdir, enabled=is_main_process)
    records = writer.keep_epochs_before(last_epoch + 1)
    for epoch in range(last_epoch + 1, config.num_epochs + 1):
        epoch_start = time.perf_counter()
        # This process's first epoch starts with one step alone: its result (or error) shows at once.
        lengths = chunk_lengths(steps_per_epoch, capacity, first=1 if epoch == last_epoch + 1 else None)
        state, train = train_epoch(train_chunk, state, dataset.train, epoch, config, mesh, lengths,
                                   capacity, show_progress=is_main_process)
        seconds = time.perf_counter() - epoch_start
        test = test_metrics()
        record = {"epoch": epoch, "train_loss": train["loss"], "train_accuracy": train["accuracy"],
                  "test_loss": test["loss"], "test_accuracy": test["accuracy"],
                  "seconds": seconds, "images_per_second": num_train / seconds}
        records.append(record)
        writer.write_epoch(record, step=int(state.step))
        if is_main_process:
            print(metrics.keras_line(record, config.num_epochs, steps_per_epoch), flush=True)
        if epoch % config.checkpoint_every_epochs == 0 or epoch == config.num_epochs:
            save_checkpoint(checkpointer, epoch, state, config)
    writer.close()
    checkpointer.close()

    test = test_metrics()
    unseen = input_pipeline.unseen_test_examples(dataset)
    unseen_test = summarize(evaluate(split_state(state)[0], runtime.gather_batches(
        dataset.test.images, dataset.test.labels,
        *input_pipeline.batch_indices(unseen, config.eval_batch_size, num_batches=len(test_batches["mask"])),
        mesh)))
    if config.bn_recalibration_batches:
        recalibrated = summarize(evaluate(
            recalibrate_batch_stats(model, split_state(state)[0], dataset.train, config, mesh), test_batches))
    last = records[-1] if records else {}
    epoch_seconds = [r["seconds"] for r in records]
    summary = {
        "test_loss": test["loss"],
        "test_accuracy": test["accuracy"],
        "test_accuracy_unseen": unseen_test["accuracy"],
        "test_examples_unseen": unseen_test["count"],
        "train_loss": last.get("train_loss"),
        "train_accuracy": last.get("train_accuracy"),
        "epochs": len(records),
        "steps": int(state.step),
        "epoch_seconds": epoch_seconds,
        "compile_seconds": compile_seconds,
        "images_per_second": num_train * len(records) / sum(epoch_seconds) if records else None,
        "backend": jax.default_backend(),
        "device_count": mesh.size,
        "process_count": jax.process_count(),
        "model": config.model,
        "conv_impl": conv.resolve_impl(config.conv_impl),
    }
    if config.bn_recalibration_batches:
        summary.update(bn_recalibration_batches=config.bn_recalibration_batches,
                       recalibrated_test_loss=recalibrated["loss"],
                       recalibrated_test_accuracy=recalibrated["accuracy"])
    if is_main_process:
        metrics.write_json(workdir / "summary.json", summary)
        if records:
            metrics.plot_curves(records, workdir / "curves.png", title=f"{config.model} on SIGNS")
        print(f"Test Loss = {test['loss']:.4f}\nTest Accuracy = {test['accuracy']:.4f}", flush=True)
        if config.bn_recalibration_batches:
            print(f"With BatchNorm statistics re-estimated over {config.bn_recalibration_batches} training "
                  f"batches: Test Loss = {recalibrated['loss']:.4f}, Test Accuracy = "
                  f"{recalibrated['accuracy']:.4f}", flush=True)
    return summary
