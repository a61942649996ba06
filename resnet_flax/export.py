"""A trained model as ONNX, for serving without JAX: ``python -m resnet_flax.export --workdir=DIR model.onnx``.

Needs the ``export`` extra (``pip install -e '.[export]'``: jax2onnx and onnxruntime). The ONNX
model is the checkpoint's network in inference mode (running BatchNorm statistics), with XLA's
own convolutions (the parameters are the same whichever kernels compute them): input ``images``,
float32 RGB pixels in [0, 255], NHWC, any batch size; output ``probabilities``, one row per image.
The preprocessing it expects is written into the model's metadata (``preprocessing``, ``classes``,
``source``). After writing, the command runs the file with onnxruntime on random images and
compares it with the flax model, so a wrong export never goes unnoticed.
"""

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags

from resnet_flax import checkpoints, cli, input_pipeline, models, pretrained
from resnet_flax.errors import UserError

FLAGS = flags.FLAGS
INPUT_NAME, OUTPUT_NAME = "images", "probabilities"


# What the exported model expects, in words, by config.preprocessing and config.normalization.
PREPROCESSING = {"resize": "the whole image resized",
                 "imagenet": "shorter side resized to image_size / 0.875, then the centre crop"}
NORMALIZATION = {"unit": "the model divides them by 255",
                 "imagenet": "the model divides them by 255 and normalises with ImageNet's mean and std"}


def define_flags() -> None:
    flags.DEFINE_string("workdir", None, "A trained run's workdir (or its checkpoints/ folder).", required=True)
    flags.DEFINE_integer("epoch", None, "Which checkpoint; default the newest that restores.")


def probabilities_fn(model, variables, normalization: str = "unit"):
    """``images`` (float32 pixels in [0, 255], NHWC) -> class probabilities, in inference mode."""
    def probabilities(images):
        return jax.nn.softmax(model.apply(variables, input_pipeline.normalize(images, normalization), train=False))
    return probabilities


def to_onnx(model, variables, config, metadata: dict[str, str]):
    """The ONNX ``ModelProto`` of ``model`` with ``variables``, its batch dimension dynamic."""
    try:
        import jax2onnx
    except ImportError:
        raise UserError("ONNX export needs the export extra: pip install -e '.[export]'") from None
    # XLA's convolutions: plain lax ops that jax2onnx translates (the CPU kernels are JAX-side speed).
    portable = model.clone(**models.layer_factories("xla", "highest", config.variant))
    image_size = config.image_size
    proto = jax2onnx.to_onnx(probabilities_fn(portable, variables, config.normalization),
                             [("B", image_size, image_size, 3)],
                             model_name="resnet_flax", input_names=[INPUT_NAME], output_names=[OUTPUT_NAME])
    for key, value in metadata.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    return proto


def max_difference(proto, model, variables, images: np.ndarray, normalization: str = "unit") -> float:
    """Largest |p_onnx - p_flax| over ``images`` (float32 pixels), onnxruntime against flax."""
    import onnxruntime

    session = onnxruntime.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    (onnx_probabilities,) = session.run([OUTPUT_NAME], {INPUT_NAME: images.astype(np.float32)})
    flax_probabilities = jax.jit(probabilities_fn(model, variables, normalization))(jnp.asarray(images))
    return float(np.abs(onnx_probabilities - np.asarray(flax_probabilities)).max())


def export_checkpoint(workdir: str | Path, path: str | Path, epoch: int | None = None) -> dict:
    """Writes the ONNX model of ``workdir``'s checkpoint to ``path``; returns what it checked."""
    trained = pretrained.load(workdir, epoch)
    config = trained.config
    source = str(checkpoints.checkpoint_root(workdir) / str(trained.epoch))
    metadata = {
        "preprocessing": (f"RGB, {config.image_size}x{config.image_size} ({PREPROCESSING[config.preprocessing]}), "
                          f"float32 pixels in [0, 255] (NHWC); {NORMALIZATION[config.normalization]}"),
        "classes": json.dumps(list(range(config.num_classes))),
        "source": source,
        "model": config.model,
    }
    variables = jax.device_get(trained.variables)
    proto = to_onnx(trained.model, variables, config, metadata)
    images = np.random.default_rng(0).uniform(0, 255, (4, config.image_size, config.image_size, 3))
    difference = max_difference(proto, trained.model, variables, images, config.normalization)
    if not difference < 1e-4:
        raise RuntimeError(f"the exported model differs from flax by {difference:.2e}")  # a bug, not the user's
    path = Path(path)
    path.write_bytes(proto.SerializeToString())
    return {"source": source, "path": str(path), "max_difference": difference}


def main(argv):
    if len(argv) != 2:
        raise UserError("usage: python -m resnet_flax.export --workdir=DIR OUT.onnx")
    result = export_checkpoint(FLAGS.workdir, argv[1], FLAGS.epoch)
    print(f"exported {result['source']} to {result['path']} (onnxruntime against flax on 4 random images: "
          f"max |difference| {result['max_difference']:.1e})")


if __name__ == "__main__":
    cli.run(main, define_flags)
