"""Classify your own images: ``python -m resnet_flax.predict --workdir=DIR IMAGE...``.

Each image (JPEG, PNG, ...; any size; RGB, grey or with alpha; phone photos turned upright by
their EXIF orientation) is resized to the model's input size and preprocessed exactly as in
training (pixels / 255). The assignment's own example used Keras's ``preprocess_input`` (ImageNet
mean subtraction) at prediction time but not in training, and got the wrong class; here the one
``input_pipeline.normalize`` serves both.

Prints per image the class and the probability vector (``--json``: one JSON object per line).
A file that cannot be classified gets its own error line; the others are still classified, and the
exit status is 1 if any failed.
"""

import json
import sys
from pathlib import Path

import numpy as np
from absl import app, flags, logging
from PIL import Image, ImageOps

from resnet_flax import input_pipeline, pretrained
from resnet_flax.errors import UserError

FLAGS = flags.FLAGS


def define_flags() -> None:
    """Command-line flags, defined only when run as a command so that importing stays free."""
    flags.DEFINE_string("workdir", None, "A trained run's workdir (or its checkpoints/ folder).", required=True)
    flags.DEFINE_integer("epoch", None, "Which checkpoint; default the newest.")
    flags.DEFINE_bool("json", False, "One JSON object per image instead of text.")


def load_image(path: str | Path, size: int) -> np.ndarray:
    """An image file as uint8 RGB (size, size, 3), upright, resized with antialiasing."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: file not found")
    image = input_pipeline.read_image(path, transform=ImageOps.exif_transpose)
    if image.shape[:2] != (size, size):
        image = np.asarray(Image.fromarray(image).resize((size, size), Image.Resampling.BILINEAR))
    return image


def classify(trained: pretrained.Trained, paths) -> list[dict]:
    """One result per path: ``{"file", "class", "probabilities"}`` or ``{"file", "error"}``."""
    results, images = [], []
    for path in paths:
        try:
            images.append(load_image(path, trained.config.image_size))
            results.append({"file": str(path)})
        except UserError as e:
            results.append({"file": str(path), "error": str(e)})
    if images:
        probabilities = iter(trained.probabilities(np.stack(images)))
        for result in results:
            if "error" not in result:
                p = next(probabilities)
                result.update({"class": int(np.argmax(p)), "probabilities": [float(x) for x in p]})
    return results


def format_result(result: dict) -> str:
    if "error" in result:
        return f"error: {result['error']}"
    vector = ", ".join(f"{p:.4f}" for p in result["probabilities"])
    last = len(result["probabilities"]) - 1
    return (f"{result['file']}: class {result['class']} (p = {max(result['probabilities']):.4f}); "
            f"[p(0)..p({last})] = [{vector}]")


def main(argv):
    paths = argv[1:]
    if not paths:
        raise app.UsageError("give one or more image files")
    logging.set_verbosity(logging.ERROR)
    try:
        trained = pretrained.load(FLAGS.workdir, FLAGS.epoch)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    results = classify(trained, paths)
    for result in results:
        line = json.dumps(result) if FLAGS.json else format_result(result)
        print(line, file=sys.stderr if "error" in result and not FLAGS.json else sys.stdout)
    sys.exit(1 if any("error" in r for r in results) else 0)


if __name__ == "__main__":
    define_flags()
    app.run(main)
