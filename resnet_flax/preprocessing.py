"""Images of any size to the model's ``image_size``, on the host, as ``config.preprocessing`` says:

- ``'resize'``: the whole image resized (bilinear, antialiased), in training and evaluation; an
  image already at the size is kept as it is (SIGNS, where ``config.augment`` adds the on-device
  shifts and flips).
- ``'imagenet'``: the standard pair. Training: torchvision's ``RandomResizedCrop`` (a crop of
  8-100% of the area, aspect ratio 3/4-4/3, resized) and a horizontal flip half of the time.
  Evaluation: the shorter side resized to ``image_size / 0.875``, then the centre crop
  (``input_pipeline.resize_pil_image``).

Images come and go as PIL images until the last step (converting to NumPy and back costs as
much as the resize). Training draws its randomness from the generator it is given: the pipeline
seeds one per (seed, epoch, example), so which worker or process decodes an example changes
nothing. The streaming feed draws the crop before decoding, so that a large JPEG is decoded only
as finely as the crop needs (``dct_reduction``).
"""

import math

import numpy as np
from PIL import Image

from resnet_flax.input_pipeline import resize_pil_image

CROP_SCALE = (0.08, 1.0)
CROP_RATIO = (3 / 4, 4 / 3)


def random_crop_box(height: int, width: int, rng: np.random.Generator) -> tuple[int, int, int, int]:
    """(top, left, crop height, crop width) as torchvision's ``RandomResizedCrop.get_params``
    draws them: ten tries at a random area and aspect ratio, else the centre crop of the nearest
    allowed ratio."""
    area = height * width
    log_ratio = (math.log(CROP_RATIO[0]), math.log(CROP_RATIO[1]))
    for _ in range(10):
        target_area = area * rng.uniform(*CROP_SCALE)
        aspect = math.exp(rng.uniform(*log_ratio))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            return int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1)), h, w
    in_ratio = width / height
    if in_ratio < CROP_RATIO[0]:
        w, h = width, int(round(width / CROP_RATIO[0]))
    elif in_ratio > CROP_RATIO[1]:
        h, w = height, int(round(height * CROP_RATIO[1]))
    else:
        h, w = height, width
    return (height - h) // 2, (width - w) // 2, h, w


def dct_reduction(box: tuple[int, int, int, int], size: int) -> int:
    """How much smaller (1, 2, 4 or 8 times each way) a JPEG can be decoded and still give the
    crop ``box`` at least ``size`` pixels each way (``input_pipeline.open_image``)."""
    fits = min(box[2], box[3]) // size
    return next(k for k in (8, 4, 2, 1) if k <= max(fits, 1))


def resized_crop(image: Image.Image, box: tuple[int, int, int, int], full_width: int, size: int,
                 flip: bool) -> np.ndarray:
    """``box`` (top, left, height, width, in the pixels of an image ``full_width`` wide) of
    ``image`` resized to (size, size) (bilinear, antialiased, one PIL call), mirrored if ``flip``.
    ``image`` may be that image decoded k times smaller (``dct_reduction``), where its pixel i
    covers the full image's pixels k*i to k*i + k - 1: the box is divided by k."""
    top, left, h, w = box
    k = max(1, round(full_width / image.width))
    crop = image.resize((size, size), Image.Resampling.BILINEAR,
                        box=(left / k, top / k, min((left + w) / k, image.width), min((top + h) / k, image.height)))
    if flip:
        crop = crop.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return np.asarray(crop)


def random_resized_crop(image: Image.Image, size: int, rng: np.random.Generator, flip: bool = True) -> np.ndarray:
    """An RGB PIL image to uint8 (size, size, 3): a ``random_crop_box`` resized, then mirrored
    left-right with probability 1/2."""
    box = random_crop_box(image.height, image.width, rng)
    return resized_crop(image, box, image.width, size, flip and rng.random() < 0.5)


def eval_image(image: Image.Image, size: int, preprocessing: str) -> np.ndarray:
    """An evaluation example's pixels: resized whole, or resized and centre-cropped ('imagenet')."""
    return np.asarray(resize_pil_image(image, size, preprocessing))
