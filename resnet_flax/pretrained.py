"""A trained model loaded from a checkpoint: what ``evaluate``, ``predict``, ``keras_io`` and
``torch_io`` use; and weights from elsewhere saved as such a checkpoint (``save_imported``).

The checkpoint carries its config, so only the workdir is needed.
"""

import dataclasses
import functools
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from resnet_flax import checkpoints, input_pipeline, models, runtime, steps
from resnet_flax import workdir as workdir_lib
from resnet_flax.errors import UserError


@dataclasses.dataclass(frozen=True)
class Trained:
    model: models.ResNet
    variables: dict
    config: ml_collections.ConfigDict
    epoch: int
    class_names: list[str]  # saved with the checkpoint; '0', '1', ... where none were

    def probabilities(self, images: np.ndarray) -> np.ndarray:
        """Class probabilities for uint8 images (N, H, W, 3), preprocessed exactly as in training."""
        return np.asarray(_probabilities(self.model, self.config.normalization, self.variables, jnp.asarray(images)))


@functools.partial(jax.jit, static_argnums=(0, 1))
def _probabilities(model, normalization, variables, images):
    logits = model.apply(variables, input_pipeline.normalize(images, normalization), train=False)
    return jax.nn.softmax(logits)


def abstract_variables(model: models.ResNet, image_size: int, mesh=None) -> dict:
    """The variables' shapes and dtypes, without computing them, replicated over ``mesh`` (default
    all devices): a checkpoint restores onto these devices whatever devices wrote it."""
    dummy = jnp.zeros((1, image_size, image_size, 3), jnp.float32)
    shapes = jax.eval_shape(functools.partial(model.init, train=False), jax.random.key(0), dummy)
    return runtime.abstract(shapes, runtime.replicated(runtime.make_mesh() if mesh is None else mesh))


def load(workdir: str | Path, epoch: int | None = None, ema: bool = False) -> Trained:
    """The model and weights of ``workdir``'s newest checkpoint that restores (or of ``epoch``);
    damaged ones are reported and skipped (``checkpoints.newest_restorable``), never moved.
    ``ema``: the moving average of the weights instead (a run with ``config.ema_decay``)."""

    def restore(epoch: int) -> Trained:
        config = checkpoints.load_config(workdir, epoch)
        model = models.model_from_config(config)
        variables, _ = checkpoints.read_variables(workdir, epoch, abstract_variables(model, config.image_size),
                                                  item="ema" if ema else "variables")
        return Trained(model, variables, config, epoch,
                       checkpoints.class_names(workdir, epoch, config.num_classes))

    return checkpoints.newest_restorable(workdir, restore, epoch)


def save_imported(workdir: str | Path, variables, config: ml_collections.ConfigDict) -> Path:
    """Writes ``variables`` (params and batch_stats, as ``config``'s model has them) as epoch 0 of a
    new ``workdir``, with a fresh optimizer state, so that ``evaluate`` and ``predict`` read it,
    ``--config.restore_from`` starts from it and ``main --workdir`` of it fine-tunes it. Returns
    the checkpoint's folder."""
    workdir = workdir_lib.prepare(workdir)
    if checkpoints.checkpoint_root(workdir).is_dir():
        raise UserError(f"{workdir}: already holds checkpoints; import into a new workdir")
    model = models.model_from_config(config)
    variables = jax.device_put(jax.tree.map(jnp.asarray, dict(variables)), runtime.replicated(runtime.make_mesh()))
    state = steps.TrainState.create(apply_fn=model.apply, params=variables["params"],
                                    batch_stats=variables["batch_stats"], tx=steps.make_optimizer(config, 1))
    checkpointer = checkpoints.Checkpointer(workdir, keep=config.keep_checkpoints)
    try:
        checkpoints.save_state(checkpointer, 0, state, config)
    finally:
        checkpointer.close()
    return checkpointer.root / "0"
