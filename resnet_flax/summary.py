"""A Keras-like model summary: ``python -m resnet_flax.summary --config=configs/signs.py``.

One row per layer with weights, in the Keras model's order (name, type, output shape, parameter
count), then the totals as Keras prints them: BatchNorm's moving mean and variance count as
non-trainable parameters, so the assignment's ResNet-50 has 23,600,006 in all, 23,546,886
trainable and 53,120 not. Shapes come from ``jax.eval_shape``: nothing is computed or compiled.
"""

import functools
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags
from ml_collections import config_flags

from resnet_flax import cli, models
from resnet_flax.keras_io.weights import keras_layer_order, layer_kind

FLAGS = flags.FLAGS
KERAS_TYPES = {"conv": "Conv2D", "batchnorm": "BatchNormalization", "dense": "Dense"}


def count(tree) -> int:
    return sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(tree))


def parameter_totals(variables: Mapping[str, Any]) -> dict[str, int]:
    """Total, trainable (``params``) and non-trainable (BatchNorm's ``batch_stats``) counts."""
    trainable, fixed = count(variables["params"]), count(variables.get("batch_stats", {}))
    return {"total": trainable + fixed, "trainable": trainable, "non_trainable": fixed}


def totals_line(variables: Mapping[str, Any]) -> str:
    totals = parameter_totals(variables)
    return (f"Total params: {totals['total']:,} (trainable {totals['trainable']:,}, "
            f"non-trainable {totals['non_trainable']:,})")


def layer_rows(model: models.ResNet, image_size: int) -> tuple[list[dict[str, Any]], dict]:
    """``(rows, variables)``: a row (name, type, output_shape, params) per layer with weights, and
    the model's variables as shapes."""
    images = jax.ShapeDtypeStruct((1, image_size, image_size, 3), jnp.float32)
    variables = jax.eval_shape(functools.partial(model.init, train=False), jax.random.key(0), images)
    _, state = jax.eval_shape(functools.partial(model.apply, train=False, capture_intermediates=True,
                                                mutable=["intermediates"]), variables, images)
    paths = models.keras_layer_paths(variables)
    rows = []
    for name in keras_layer_order(paths):
        path = paths[name]
        output = functools.reduce(lambda tree, key: tree[key], path, state["intermediates"])["__call__"][0]
        if isinstance(output, tuple):  # a conv whose bias its BatchNorm takes in: (output, bias)
            output = output[0]
        weights = [functools.reduce(lambda tree, key: tree.get(key, {}), path, variables[collection])
                   for collection in ("params", "batch_stats")]
        rows.append({"name": name, "type": KERAS_TYPES[layer_kind(variables, path)],
                     "output_shape": (None, *output.shape[1:]), "params": count(weights)})
    return rows, variables


def format_summary(model_name: str, rows, variables) -> str:
    width = max(len(f"{r['name']} ({r['type']})") for r in rows) + 2
    lines = [f'Model: "{model_name}"', f"{'Layer (type)':<{width}}{'Output Shape':<22}Param #"]
    lines += [f"{r['name'] + ' (' + r['type'] + ')':<{width}}{str(r['output_shape']):<22}{r['params']:,}"
              for r in rows]
    totals = parameter_totals(variables)
    lines += [f"Total params: {totals['total']:,}", f"Trainable params: {totals['trainable']:,}",
              f"Non-trainable params: {totals['non_trainable']:,}"]
    return "\n".join(lines)


def define_flags() -> None:
    config_flags.DEFINE_config_file("config", None, "Config file (configs/*.py).", lock_config=True)
    flags.mark_flags_as_required(["config"])


def main(argv):
    del argv
    config = FLAGS.config
    rows, variables = layer_rows(models.model_from_config(config), config.image_size)
    print(format_summary(config.model, rows, variables))


if __name__ == "__main__":
    cli.run(main, define_flags)
