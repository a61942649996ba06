"""Weights from the PyTorch world to and from this project's checkpoints.

    python -m resnet_flax.torch_io import resnet50.pth --model=resnet50 --workdir=runs/tv_resnet50
    python -m resnet_flax.torch_io export --workdir=runs/tv_resnet50 out.safetensors

``import`` reads a torchvision or timm ResNet ``state_dict`` (``.pth``/``.pt`` loaded with
``weights_only=True``, or ``.safetensors``) into the torchvision layout of ``--model`` and writes
an orbax checkpoint (epoch 0, a fresh optimizer state) whose config records what the weights
expect: torchvision's evaluation preprocessing (224x224, shorter side resized to 256 and the
centre crop, ImageNet's mean and standard deviation). ``evaluate`` and ``predict`` read it,
``--config.restore_from`` starts a run from it. ``export`` writes a checkpoint of the torchvision
layout as a ``state_dict`` that ``torchvision.models.<model>().load_state_dict`` takes.
"""

from pathlib import Path

import jax
from absl import flags

from resnet_flax import checkpoints, cli, models, pretrained
from resnet_flax.config import default_config
from resnet_flax.errors import UserError
from resnet_flax.torch_io.state_dict import (
    read_state_dict,
    state_dict_from_variables,
    variables_from_state_dict,
    write_state_dict,
)

FLAGS = flags.FLAGS
TORCHVISION_IMAGE_SIZE = 224


def define_flags() -> None:
    """Command-line flags, defined only when run as a command so that importing stays free."""
    flags.DEFINE_string("workdir", None, "The run directory to write (import) or read (export).", required=True)
    flags.DEFINE_string("model", None, "import: the ResNet the file holds (resnet18 ... resnet152).")
    flags.DEFINE_integer("epoch", None, "export: which checkpoint; default the newest.")


def imported_config(model: str, num_classes: int):
    """The config of torchvision's weights: its layout and its evaluation preprocessing."""
    config = default_config()
    config.model = model
    config.variant = "torchvision"
    config.num_classes = num_classes
    config.image_size = TORCHVISION_IMAGE_SIZE
    config.normalization = "imagenet"
    config.preprocessing = "imagenet"
    return config


def import_weights(path: str | Path, model: str, workdir: str | Path) -> tuple[Path, int]:
    """Writes a checkpoint of ``path``'s weights into ``workdir``; returns it and num_classes."""
    if not model:
        raise UserError("import needs --model (one of resnet18, resnet34, resnet50, resnet101, resnet152)")
    if model not in models.MODELS:
        raise UserError(f"--model: unknown model {model!r}; expected one of {sorted(models.MODELS)}")
    state_dict = read_state_dict(path)
    head = state_dict.get("fc.weight")
    if head is None or getattr(head, "ndim", 0) != 2:
        raise UserError(f"{path}: has no fc.weight of shape (classes, features); not a torchvision ResNet")
    config = imported_config(model, int(head.shape[0]))
    abstract = pretrained.abstract_variables(models.model_from_config(config), config.image_size)
    variables = variables_from_state_dict(state_dict, abstract, str(path), model)
    return pretrained.save_imported(workdir, variables, config), config.num_classes


def export_weights(workdir: str | Path, path: str | Path, epoch: int | None = None) -> int:
    """Writes the weights of ``workdir``'s newest checkpoint that restores (or of ``epoch``) as a
    torchvision ``state_dict``; returns its epoch."""
    trained = pretrained.load(workdir, epoch)
    if trained.config.variant != "torchvision":  # load_config fills fields older configs lack
        raise UserError(f"{workdir}: holds a {trained.config.model} in the {trained.config.variant!r} layout; "
                        "only the torchvision layout has a torchvision twin to export to")
    write_state_dict(state_dict_from_variables(jax.device_get(trained.variables)), path)
    return trained.epoch


def main(argv):
    if len(argv) != 3 or argv[1] not in ("import", "export"):
        raise UserError("usage: python -m resnet_flax.torch_io import FILE --model=resnet50 --workdir=DIR | "
                        "export --workdir=DIR OUT.safetensors|OUT.pth")
    command, path = argv[1], argv[2]
    if command == "import":
        saved, num_classes = import_weights(path, FLAGS.model, FLAGS.workdir)
        print(f"imported {path} ({FLAGS.model}, {num_classes} classes) into {saved}")
    else:
        epoch = export_weights(FLAGS.workdir, path, FLAGS.epoch)
        print(f"exported {checkpoints.checkpoint_root(FLAGS.workdir) / str(epoch)} to {path}")


if __name__ == "__main__":
    cli.run(main, define_flags)
