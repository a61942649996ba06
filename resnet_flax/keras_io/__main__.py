"""Keras weights to and from this project's checkpoints.

    python -m resnet_flax.keras_io import ResNet50.h5 --workdir=runs/keras_resnet50
    python -m resnet_flax.keras_io export --workdir=runs/signs out.weights.h5

``import`` writes an orbax checkpoint (epoch 0, a fresh Adam state) that ``evaluate`` and
``predict`` read, and that ``main`` with ``--workdir`` of it fine-tunes from. ``export`` writes the
newest checkpoint's weights for Keras's ``model.load_weights`` (``.weights.h5``: Keras 3 layout;
other ``.h5``: Keras 2 layout).
"""

from pathlib import Path

import jax
from absl import flags

from resnet_flax import checkpoints, cli, pretrained
from resnet_flax.config import default_config
from resnet_flax.errors import UserError
from resnet_flax.keras_io.weights import load_keras_weights, save_keras_weights

FLAGS = flags.FLAGS


def define_flags() -> None:
    """Command-line flags, defined only when run as a command so that importing stays free."""
    flags.DEFINE_string("workdir", None, "The run directory to write (import) or read (export).", required=True)
    flags.DEFINE_integer("epoch", None, "export: which checkpoint; default the newest.")


def import_weights(keras_file: str | Path, workdir: str | Path) -> int:
    """Writes a checkpoint of ``keras_file``'s weights into ``workdir``; returns num_classes."""
    variables, num_classes = load_keras_weights(keras_file)
    config = default_config()
    config.num_classes = num_classes
    pretrained.save_imported(workdir, variables, config)
    return num_classes


def export_weights(workdir: str | Path, keras_file: str | Path, epoch: int | None = None) -> int:
    """Writes the weights of ``workdir``'s newest checkpoint that restores (or of ``epoch``);
    returns its epoch."""
    trained = pretrained.load(workdir, epoch)
    if (trained.config.model, trained.config.variant) != ("resnet50", "assignment"):
        raise UserError(f"{workdir}: holds a {trained.config.model} in the {trained.config.variant!r} layout; "
                        "only the assignment's resnet50 has a Keras twin to export to")
    save_keras_weights(jax.device_get(trained.variables), keras_file)
    return trained.epoch


def main(argv):
    if len(argv) != 3 or argv[1] not in ("import", "export"):
        raise UserError("usage: python -m resnet_flax.keras_io import FILE.h5 --workdir=DIR | "
                        "export --workdir=DIR OUT.h5")
    command, path = argv[1], argv[2]
    if command == "import":
        num_classes = import_weights(path, FLAGS.workdir)
        print(f"imported {path} ({num_classes} classes) into {checkpoints.checkpoint_root(FLAGS.workdir)}/0")
    else:
        epoch = export_weights(FLAGS.workdir, path, FLAGS.epoch)
        print(f"exported {checkpoints.checkpoint_root(FLAGS.workdir) / str(epoch)} to {path}")


if __name__ == "__main__":
    cli.run(main, define_flags)
