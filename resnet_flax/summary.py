"""A Keras-like model summary: ``python -m resnet_flax.summary --config=configs/signs.py``.

One row per layer with weights, in the Keras model's order (name, type, output shape, parameter
count), then the totals as Keras prints them: BatchNorm's moving mean and variance count as
non-trainable parameters, so the assignment's ResNet-50 has 23,600,006 in all, 23,546,886
trainable and 53,120 not. Shapes come from ``jax.eval_shape``: nothing is computed or compiled.
"""

import functools
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from absl import flags
from ml_collections import config_flags

from resnet_flax import cli, models
from resnet_flax.keras_io.weights import keras_layer_order, layer_kind
from resnet_flax.torch_io.state_dict import torch_module_name

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


def forward_order(model, variables, images) -> dict[str, tuple[str, ...]]:
    """Every layer with weights, in the order the forward pass calls them, named by its dotted
    path (``layer1.0.conv1``: torchvision's ``state_dict`` names for its layout)."""
    called = []

    def record(next_fun, args, kwargs, context):
        if context.method_name == "__call__":
            called.append(tuple(context.module.path))
        return next_fun(*args, **kwargs)

    with nn.intercept_methods(record):
        jax.eval_shape(functools.partial(model.apply, train=False), variables, images)
    return {torch_module_name(path): path for path in dict.fromkeys(called)
            if path and _holds_leaves(variables["params"], path)}


def _holds_leaves(params, path) -> bool:
    """Whether the module at ``path`` has weights of its own."""
    tree = params
    for key in path:
        if not isinstance(tree, Mapping) or key not in tree:
            return False
        tree = tree[key]
    return isinstance(tree, Mapping) and any(not isinstance(leaf, Mapping) for leaf in tree.values())


def layer_rows(model, image_size: int) -> tuple[list[dict[str, Any]], dict]:
    """``(rows, variables)``: a row (name, type, output_shape, params) per layer with weights, and
    the model's variables as shapes. The assignment's layout is listed by Keras names in the Keras
    model's order, the others by module path in the order of the forward pass."""
    images = jax.ShapeDtypeStruct((1, image_size, image_size, 3), jnp.float32)
    variables = jax.eval_shape(functools.partial(model.init, train=False), jax.random.key(0), images)
    _, state = jax.eval_shape(functools.partial(model.apply, train=False, capture_intermediates=True,
                                                mutable=["intermediates"]), variables, images)
    if isinstance(model, models.ResNet):
        paths = models.keras_layer_paths(variables)
        paths = {name: paths[name] for name in keras_layer_order(paths)}
    else:
        paths = forward_order(model, variables, images)
    rows = []
    for name, path in paths.items():
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
