"""The train state, the optimizer and the compiled steps: what one step (or one chunk of steps)
of training and of evaluation computes.

A training chunk runs up to ``config.steps_per_chunk`` steps in one compiled call, a loop on
donated buffers over batches the host gathered (``train.py`` drives it). The last, partial batch
of an epoch is padded and masked: BatchNorm statistics and the loss ignore the padding, so every
training example is used each epoch, and evaluation counts each test example exactly once.
"""

import functools
import math
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax.training import train_state
from jax import lax

from resnet_flax import input_pipeline, program_cache, runtime


class TrainState(train_state.TrainState):
    """Step, params, optimizer state, BatchNorm's running statistics, and (with
    ``config.ema_decay``) their exponential moving average ``ema`` (``params``, ``batch_stats``)."""

    batch_stats: Any
    ema: Any = None


# ---------------------------------------------------------------------------------------------
# Set-up


def decays(params) -> Any:
    """True for the leaves weight decay applies to: conv and dense kernels, not BatchNorm's scale
    and shift nor any bias."""
    return jax.tree_util.tree_map_with_path(lambda path, _: path[-1].key == "kernel", params)


def _learning_rate(config, steps_per_epoch: int):
    if config.lr_schedule != "cosine":
        return config.learning_rate
    total = max(config.num_epochs * steps_per_epoch, 1)
    warmup = min(int(config.warmup_epochs * steps_per_epoch), total - 1)
    return optax.warmup_cosine_decay_schedule(0.0, config.learning_rate, max(warmup, 1), total, end_value=0.0)


def make_optimizer(config: ml_collections.ConfigDict, steps_per_epoch: int,
                   head_name: str | None = None) -> optax.GradientTransformation:
    """``config.optimizer`` at the (scheduled) learning rate: Adam with Keras's defaults (lr 1e-3,
    b1 0.9, b2 0.999, eps 1e-7) unless the config says otherwise, AdamW, or SGD with (Nesterov)
    momentum; weight decay on kernels only (``decays``); the gradient first clipped to
    ``config.grad_clip_norm``; with ``config.freeze='backbone'``, every parameter outside the
    output layer ``head_name`` left as it is (no update, no optimizer state)."""
    learning_rate = _learning_rate(config, steps_per_epoch)
    name = config.get("optimizer", "adam")
    adam = dict(b1=config.adam_b1, b2=config.adam_b2, eps=config.adam_eps)
    if name == "adamw":
        tx = optax.adamw(learning_rate, weight_decay=config.weight_decay, mask=decays, **adam)
    elif name == "sgd":
        tx = optax.sgd(learning_rate, momentum=config.momentum or None, nesterov=config.nesterov)
        if config.weight_decay:  # PyTorch's SGD: L2 added to the gradient, before the momentum
            tx = optax.chain(optax.add_decayed_weights(config.weight_decay, mask=decays), tx)
    else:
        tx = optax.adam(learning_rate, **adam)
    if config.get("grad_clip_norm", 0.0):
        tx = optax.chain(optax.clip_by_global_norm(config.grad_clip_norm), tx)
    if config.get("freeze", ""):
        if head_name is None:
            raise ValueError("config.freeze needs the model's head_name")
        labels = lambda params: {module: "train" if module == head_name else "frozen" for module in params}
        tx = optax.multi_transform({"train": tx, "frozen": optax.set_to_zero()}, labels)
    return tx


def _initializer(config, model, steps_per_epoch: int, mesh, programs):
    """The exported ``model.init`` (variables, replicated) and ``variables -> TrainState``."""
    tx = make_optimizer(config, steps_per_epoch, model.head_name)

    def init_variables():
        dummy = jnp.zeros((1, config.image_size, config.image_size, 3), jnp.float32)
        return model.init(jax.random.key(config.seed), dummy, train=False)

    def create(variables) -> TrainState:
        variables = {"params": variables["params"], "batch_stats": variables["batch_stats"]}
        ema = jax.tree.map(jnp.copy, variables) if config.get("ema_decay", 0.0) else None
        return TrainState.create(apply_fn=model.apply, tx=tx, ema=ema, **variables)

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
    variables = runtime.abstract(jax.tree.unflatten(init.out_tree, list(init.out_avals)), replicated)
    return runtime.abstract(jax.eval_shape(create, variables), replicated)


# ---------------------------------------------------------------------------------------------
# Steps


def cross_entropy(logits, labels, num_classes: int, label_smoothing: float = 0.0):
    """Per-example softmax cross-entropy (the assignment's categorical_crossentropy)."""
    targets = jax.nn.one_hot(labels, num_classes)
    if label_smoothing:
        targets = optax.smooth_labels(targets, label_smoothing)
    return optax.softmax_cross_entropy(logits, targets)


def example_sums(per_example_loss, logits, labels, mask) -> dict[str, jax.Array]:
    """Loss and hit sums over the real (unmasked) examples: they add up exactly across batches."""
    weight = mask.astype(jnp.float32)
    return {
        "loss_sum": jnp.sum(per_example_loss * weight),
        "correct": jnp.sum((jnp.argmax(logits, -1) == labels) * weight),
        "count": jnp.sum(weight),
    }


def train_step(state: TrainState, batch: Mapping[str, jax.Array], rng: jax.Array, *,
               num_classes: int, label_smoothing: float = 0.0, augment: bool = False,
               normalization: str = "unit", frozen_backbone: bool = False, ema_decay: float = 0.0):
    """One optimizer step on a batch of uint8 images; returns the new state and the batch's sums.

    ``frozen_backbone`` runs the model in inference mode (BatchNorm with its running statistics,
    which stay as they are; the optimizer updates the output layer alone); ``ema_decay`` > 0
    moves ``state.ema`` towards the new weights."""
    images = input_pipeline.normalize(batch["image"], normalization)
    if augment:
        images = input_pipeline.augment(images, jax.random.fold_in(rng, state.step))
    labels, mask = batch["label"], batch["mask"]

    def loss_fn(params):
        variables = {"params": params, "batch_stats": state.batch_stats}
        if frozen_backbone:
            logits, batch_stats = state.apply_fn(variables, images, train=False), state.batch_stats
        else:
            logits, updates = state.apply_fn(variables, images, train=True, mask=mask, mutable=["batch_stats"])
            batch_stats = updates["batch_stats"]
        per_example = cross_entropy(logits, labels, num_classes, label_smoothing)
        loss = jnp.sum(per_example * mask) / jnp.maximum(jnp.sum(mask), 1)
        return loss, (per_example, logits, batch_stats)

    grads, (per_example, logits, batch_stats) = jax.grad(loss_fn, has_aux=True)(state.params)
    state = state.apply_gradients(grads=grads, batch_stats=batch_stats)
    if ema_decay:
        state = state.replace(ema=moving_average(state.ema, {"params": state.params, "batch_stats": batch_stats},
                                                 ema_decay))
    return state, example_sums(per_example, logits, labels, mask)


def moving_average(average, value, decay: float):
    """``decay * average + (1 - decay) * value``, leaf by leaf."""
    return jax.tree.map(lambda a, v: decay * a + (1.0 - decay) * v, average, value)


def eval_step(apply_fn, variables: Mapping, batch: Mapping[str, jax.Array], *, num_classes: int,
              normalization: str = "unit", confusion: bool = False):
    """Inference-mode sums on a batch (running BatchNorm statistics, nothing updated); with
    ``confusion`` also the confusion matrix's counts (row: true class, column: predicted)."""
    logits = apply_fn(variables, input_pipeline.normalize(batch["image"], normalization), train=False)
    per_example = cross_entropy(logits, batch["label"], num_classes)
    sums = example_sums(per_example, logits, batch["label"], batch["mask"])
    if confusion:
        truth = jax.nn.one_hot(batch["label"], num_classes) * batch["mask"][:, None]
        predicted = jax.nn.one_hot(jnp.argmax(logits, -1), num_classes)
        sums["confusion"] = truth.T @ predicted
    return sums


def scan_batches(step_fn, carry, batches):
    """Runs ``step_fn(carry, batch)`` over the leading (step) axis of ``batches`` and adds up the
    per-step sums."""
    carry, sums = lax.scan(step_fn, carry, batches)
    return carry, jax.tree.map(lambda per_step: jnp.sum(per_step, axis=0), sums)


def nonfinite_state(state: TrainState) -> dict[str, jax.Array]:
    """1.0 where the parameters or BatchNorm's running statistics hold a NaN or an infinity (a
    non-finite gradient makes the parameters so at its update), else 0.0: checked once per chunk,
    since weights can break while the loss, computed before each update, still looks fine."""
    def flag(tree) -> jax.Array:
        finite = jnp.stack([jnp.all(jnp.isfinite(leaf)) for leaf in jax.tree.leaves(tree)])
        return 1.0 - jnp.all(finite).astype(jnp.float32)

    return {"nonfinite_params": flag(state.params), "nonfinite_batch_stats": flag(state.batch_stats)}


def make_train_chunk(config):
    """``(state, batches, num_steps) -> (state, sums)``: the first ``num_steps`` batches of
    ``batches`` (arrays of shape (chunk, batch, ...)), all steps in one compiled call, the state's
    buffers donated. The sums are per step (arrays of the chunk's length, zero past ``num_steps``),
    so that a host adding them up in step order gets the same totals however an epoch was split
    into calls; they also hold the ``nonfinite_state`` the chunk ends with. ``num_steps``
    defaults to all of them. It is a traced value: one program runs chunks of any length up to
    the arrays' (an epoch's short first or last chunk included).
    Augmentation draws from ``config.seed`` folded with the step, so a resumed run repeats it
    exactly."""
    step = functools.partial(train_step, num_classes=config.num_classes,
                             label_smoothing=config.label_smoothing, augment=config.augment,
                             normalization=config.get("normalization", "unit"),
                             frozen_backbone=config.get("freeze", "") == "backbone",
                             ema_decay=config.get("ema_decay", 0.0))

    def train_chunk(state, batches, num_steps):
        rng = jax.random.key(config.seed)

        def one_step(i, carry):
            state, per_step = carry
            batch = jax.tree.map(lambda a: lax.dynamic_index_in_dim(a, i, keepdims=False), batches)
            state, sums = step(state, batch, rng)
            return state, jax.tree.map(lambda all_, one: all_.at[i].set(one), per_step, sums)

        zeros = dict.fromkeys(("loss_sum", "correct", "count"), jnp.zeros(len(batches["mask"]), jnp.float32))
        state, per_step = lax.fori_loop(0, num_steps, one_step, (state, zeros))
        return state, {**per_step, **nonfinite_state(state)}

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
    compiled = programs.compile("train_chunk", flat_chunk, runtime.abstract(jax.tree.leaves(state)), batches,
                                num_steps, extra={"steps_per_epoch": steps_per_epoch}, donate_argnums=(0,))

    def train_chunk(state, batches, num_steps):
        leaves, sums = compiled(jax.tree.leaves(state), batches, num_steps)
        return jax.tree.unflatten(treedef, leaves), sums

    return train_chunk


SUMMED = ("loss_sum", "correct", "count")  # what the steps sum, per example


def summarize(sums: Mapping[str, Any]) -> dict[str, float]:
    """Mean loss and accuracy from summed ones, or per-step ones (NaN when no example was counted)."""
    sums = {name: float(np.sum(jax.device_get(sums[name]), dtype=np.float64)) for name in SUMMED}
    count = sums["count"]
    mean = (lambda total: total / count) if count else (lambda total: math.nan)
    return {"loss": mean(sums["loss_sum"]), "accuracy": mean(sums["correct"]), "count": int(count)}
