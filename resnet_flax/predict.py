"""Classify your own images: ``python -m resnet_flax.predict --workdir=DIR IMAGE...``.

Each image (JPEG, PNG, ...; any size; RGB, grey or with alpha; phone photos turned upright by
their EXIF orientation) is brought to the model's input size as the checkpoint's config says
(``preprocessing``: resized whole, or, for torchvision's weights, shorter side resized to
image_size / 0.875 and centre-cropped) and normalised exactly as in training (``normalization``:
pixels / 255, or then ImageNet's mean and std). The assignment's own example used Keras's
``preprocess_input`` (ImageNet mean subtraction) at prediction time but not in training, and got
the wrong class; here the one ``input_pipeline.normalize`` serves both.

Prints per image the class (its name, as the training data named it: a class folder's name, or
SIGNS's digit) and the probability vector (``--json``: one JSON object per line, with ``class``
the index and ``name`` the name).
A folder stands for the images in it, in sorted order (``--recursive``: in its subfolders too). A
file that cannot be classified gets its own error line; the others are still classified, and the
exit status is 1 if any failed.
"""

import json
import sys
from pathlib import Path

import numpy as np
from absl import flags

from resnet_flax import checkpoints, cli, input_pipeline, pretrained
from resnet_flax.errors import UserError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")

FLAGS = flags.FLAGS


def define_flags() -> None:
    """Command-line flags, defined only when run as a command so that importing stays free."""
    flags.DEFINE_string("workdir", None, "A trained run's workdir (or its checkpoints/ folder).", required=True)
    flags.DEFINE_integer("epoch", None, "Which checkpoint; default the newest.")
    flags.DEFINE_bool("json", False, "One JSON object per image instead of text.")
    flags.DEFINE_bool("recursive", False, "For a folder, also classify the images in its subfolders.")
    flags.DEFINE_bool("ema", False, "Use the moving average of the weights (config.ema_decay > 0).")


def load_image(path: str | Path, size: int, preprocessing: str = "resize") -> np.ndarray:
    """An image file as uint8 RGB (size, size, 3), upright, brought to ``size`` by
    ``input_pipeline.resize_pil_image`` (resized whole, or 'imagenet': resized and centre-cropped)."""
    path = Path(path)
    if path.is_dir():
        raise UserError(f"{path}: a folder without image files ({', '.join(IMAGE_SUFFIXES)}); "
                        "--recursive also searches its subfolders")
    if not path.is_file():
        raise UserError(f"{path}: file not found")
    image = input_pipeline.open_image(path, transform=input_pipeline.upright)
    return np.asarray(input_pipeline.resize_pil_image(image, size, preprocessing))


def expand_folders(paths, recursive: bool = False) -> list[Path]:
    """``paths`` with each folder replaced by the image files in it (by suffix), sorted; a folder
    without images stays, and is reported as such."""
    expanded = []
    for path in map(Path, paths):
        if path.is_dir():
            found = sorted(p for p in (path.rglob("*") if recursive else path.iterdir())
                           if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
            expanded += found or [path]
        else:
            expanded.append(path)
    return expanded


def classify(trained: pretrained.Trained, paths) -> list[dict]:
    """One result per path: ``{"file", "class", "name", "probabilities"}`` or ``{"file", "error"}``."""
    results, images = [], []
    for path in paths:
        try:
            images.append(load_image(path, trained.config.image_size, trained.config.preprocessing))
            results.append({"file": str(path)})
        except UserError as e:
            results.append({"file": str(path), "error": str(e)})
    if images:
        probabilities = iter(trained.probabilities(np.stack(images)))
        for result in results:
            if "error" not in result:
                p = next(probabilities)
                best = int(np.argmax(p))
                result.update({"class": best, "name": trained.class_names[best],
                               "probabilities": [float(x) for x in p]})
    return results


def format_result(result: dict) -> str:
    if "error" in result:
        return f"error: {result['error']}"
    vector = ", ".join(f"{p:.4f}" for p in result["probabilities"])
    last = len(result["probabilities"]) - 1
    return (f"{result['file']}: class {result['name']} (p = {max(result['probabilities']):.4f}); "
            f"[p(0)..p({last})] = [{vector}]")


def main(argv):
    if not argv[1:]:
        raise UserError("give one or more image files or folders")
    trained = pretrained.load(FLAGS.workdir, FLAGS.epoch, FLAGS.ema)
    print(f"checkpoint: {checkpoints.checkpoint_root(FLAGS.workdir) / str(trained.epoch)}", file=sys.stderr)
    results = classify(trained, expand_folders(argv[1:], FLAGS.recursive))
    for result in results:
        line = json.dumps(result) if FLAGS.json else format_result(result)
        print(line, file=sys.stderr if "error" in result and not FLAGS.json else sys.stdout)
    sys.exit(1 if any("error" in r for r in results) else 0)


if __name__ == "__main__":
    cli.run(main, define_flags)
