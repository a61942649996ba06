"""Where a run's weights come from: its own newest checkpoint (resume), another run's
(``config.restore_from``: all weights, or with another number of classes all but the output layer,
for transfer learning), or a fresh start."""

import jax
import jax.numpy as jnp
import ml_collections

from resnet_flax import checkpoints, models, runtime
from resnet_flax.errors import UserError


def restore_run(state, config: ml_collections.ConfigDict, checkpointers: list[checkpoints.Checkpointer],
                head_name: str):
    """Resumes from the workdir's newest good checkpoint (of ``checkpointers``: after epochs and
    within them, the one at the later step), else starts from ``config.restore_from`` if set,
    else keeps the fresh ``state``. Returns the state and where training stands: ``{"epoch"``: the
    epochs completed, ``"batch"``: the batches of the next one trained on, ``"totals"``: that
    epoch's sums so far``}``. ``head_name`` is the model's output layer (``model.head_name``)."""
    variables, optimizer = (runtime.abstract(tree) for tree in checkpoints.split_state(state))
    ema = runtime.abstract(state.ema) if state.ema is not None else None
    newest_first = sorted(checkpointers, key=lambda c: c.newest_step() or -1, reverse=True)
    for checkpointer in newest_first:
        restored = checkpointer.restore_latest(variables, optimizer, ema)
        if restored is None:
            continue
        variables, optimizer, restored_ema, progress = restored
        where = f"epoch {progress['epoch']}" if not progress["batch"] else \
            f"epoch {progress['epoch'] + 1}, after batch {progress['batch']}"
        print(f"Resuming from {checkpointer.root / str(progress['key'])} ({where})", flush=True)
        if ema is not None and restored_ema is None:
            print("That checkpoint holds no moving average of the weights: it starts from them", flush=True)
            restored_ema = jax.tree.map(jnp.copy, variables)
        progress["path"] = checkpointer.root / str(progress["key"])
        return state.replace(**variables, **optimizer, ema=restored_ema), progress
    fresh = {"epoch": 0, "batch": 0}
    if config.restore_from:
        return start_from(state, config, variables, optimizer, head_name), fresh
    return state, fresh


def start_from(state, config, variables, optimizer, head_name: str):
    """``state`` with the weights of ``config.restore_from``'s newest good checkpoint (and its
    optimizer state, with ``config.restore_optimizer``); from a checkpoint of another number of
    classes, all weights but the output layer, which keeps its fresh initialisation."""
    path = config.restore_from
    root = checkpoints.checkpoint_root(path)

    def restore(epoch: int):
        source = checkpoints.load_config(path, epoch)
        source_head = models.model_from_config(source).head_name
        saved = checkpoints.variables_metadata(path, epoch)
        same_head = source_head == head_name and _shapes(saved["params"].get(source_head)) == _shapes(
            variables["params"][head_name])
        if same_head:
            restored, opt = checkpoints.read_variables(path, epoch, variables,
                                                       optimizer if config.restore_optimizer else None)
            return restored, opt, epoch, None
        if config.restore_optimizer:
            raise UserError(f"{root / str(epoch)}: its output layer {source_head} differs from this model's "
                            f"{head_name} ({config.num_classes} classes), so its optimizer state does not "
                            "fit; set config.restore_optimizer=False")
        if source_head not in saved["params"]:
            raise UserError(f"{root / str(epoch)}: has no output layer {source_head}")
        sharding = jax.tree.leaves(variables)[0].sharding
        target = {**variables, "params": {
            **{name: tree for name, tree in variables["params"].items() if name != head_name},
            source_head: jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=sharding),
                                      saved["params"][source_head])}}
        restored, _ = checkpoints.read_variables(path, epoch, target)
        params = {name: tree for name, tree in restored["params"].items() if name != source_head}
        restored = {**restored, "params": {**params, head_name: state.params[head_name]}}
        return restored, None, epoch, f"{source_head}, {source.num_classes} classes"

    restored, opt, epoch, dropped = checkpoints.newest_restorable(path, restore)
    source = root / str(epoch)
    if dropped is not None:
        print(f"Starting from the weights of {source} but its output layer ({dropped}): {head_name} "
              f"starts fresh for {config.num_classes} classes", flush=True)
    else:
        what = "weights and optimizer state" if config.restore_optimizer else "weights"
        print(f"Starting from the {what} of {source}", flush=True)
    state = state.replace(**restored, **(opt or {}))
    if state.ema is not None:
        state = state.replace(ema=jax.tree.map(jnp.copy, restored))
    return state


def _shapes(tree) -> list:
    return [tuple(leaf.shape) for leaf in jax.tree.leaves(tree)] if tree is not None else []
