"""SIGNS: load the course's h5 files or a folder of JPEGs, check them, and order them into batches.

Images stay uint8 in memory and on the device; :func:`normalize` (pixels / 255, or then ImageNet's
mean and std) is applied inside the compiled step, and by ``predict`` to its images, so training
and prediction preprocess alike. :func:`resize_image` brings an image of another size to the
model's (``predict``, ``evaluate`` of a model trained at another size).

Where the data is looked for, in order: ``config.data_dir``, the ``SIGNS_DATA_DIR`` environment
variable, ``./datasets``, then ``shared/data/signs`` next to the repository (``../shared/data/signs``
from its root). A directory holds the data if it has ``train_signs.h5`` and ``test_signs.h5``, or
the JPEG folders ``train_signs/`` and ``test_signs/`` of ``{label}_IMG_{id}.jpg`` files.
"""

import dataclasses
import os
import re
import warnings
from pathlib import Path

import h5py
import jax.numpy as jnp
import numpy as np
from PIL import Image, ImageOps

from resnet_flax.errors import UserError

REPOSITORY_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_SEARCH_PATH = (Path("datasets"), REPOSITORY_ROOT.parent / "shared" / "data" / "signs")
DATA_DIR_ENV = "SIGNS_DATA_DIR"
SPLITS = ("train", "test")
FORMATS = ("auto", "h5", "jpg")
_JPEG_NAME = re.compile(r"^(\d+)_.*\.(jpe?g|png)$", re.IGNORECASE)


@dataclasses.dataclass(frozen=True)
class Split:
    images: np.ndarray  # uint8 (N, H, W, 3)
    labels: np.ndarray  # int32 (N,)
    source: str  # where it was read from, for messages

    def __len__(self) -> int:
        return len(self.labels)


@dataclasses.dataclass(frozen=True)
class Dataset:
    train: Split
    test: Split
    num_classes: int


# ImageNet's per-channel pixel statistics (RGB, of pixels / 255), as torchvision normalises.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
NORMALIZATIONS = ("unit", "imagenet")


def normalize(images, normalization: str = "unit") -> jnp.ndarray:
    """uint8 pixels to float32 model inputs: 'unit' is the assignment's ``X / 255.``; 'imagenet'
    then subtracts ImageNet's mean and divides by its standard deviation, per channel."""
    x = jnp.asarray(images, jnp.float32) / 255.0
    if normalization == "unit":
        return x
    if normalization == "imagenet":
        return (x - jnp.asarray(IMAGENET_MEAN, jnp.float32)) / jnp.asarray(IMAGENET_STD, jnp.float32)
    raise ValueError(f"normalization must be one of {NORMALIZATIONS}, got {normalization!r}")


def _holds_data(directory: Path, data_format: str) -> bool:
    h5 = all((directory / f"{s}_signs.h5").is_file() for s in SPLITS)
    jpg = all((directory / f"{s}_signs").is_dir() for s in SPLITS)
    return {"auto": h5 or jpg, "h5": h5, "jpg": jpg}[data_format]


def find_data_dir(data_dir: str | None = None, data_format: str = "auto") -> Path:
    """The first directory that holds SIGNS; an explicitly given one must hold it."""
    if data_format not in FORMATS:
        raise UserError(f"config.data_format must be one of {FORMATS}, got {data_format!r}")
    explicit = [("config.data_dir", data_dir), (f"${DATA_DIR_ENV}", os.environ.get(DATA_DIR_ENV))]
    what = "train_signs.h5 and test_signs.h5, or train_signs/ and test_signs/ JPEG folders"
    for source, value in explicit:
        if value:
            directory = Path(value).expanduser()
            if not _holds_data(directory, data_format):
                raise UserError(f"{source}={value}: expected a directory with {what}")
            return directory
    for directory in DEFAULT_SEARCH_PATH:
        if _holds_data(directory, data_format):
            return directory
    looked = ", ".join(str(d.resolve()) for d in DEFAULT_SEARCH_PATH)
    raise UserError(
        f"SIGNS data not found: looked in {looked} for {what}; "
        f"set config.data_dir or ${DATA_DIR_ENV}"
    )


def _check_split(images, labels, source: str, num_classes: int, image_size: int | None) -> Split:
    """``image_size`` None accepts images of any one size."""
    if images.dtype != np.uint8:
        raise UserError(f"{source}: images must be uint8 pixels, got dtype {images.dtype}")
    expected = (image_size, image_size, 3) if image_size is not None else (*images.shape[1:3], 3)
    if images.ndim != 4 or images.shape[1:] != expected:
        size = "H, W, 3" if image_size is None else ", ".join(map(str, expected))
        raise UserError(f"{source}: images must have shape (N, {size}), got {images.shape}")
    if not np.issubdtype(labels.dtype, np.integer) or labels.shape != (len(images),):
        raise UserError(f"{source}: labels must be {len(images)} integers, one per image, "
                        f"got dtype {labels.dtype} and shape {labels.shape}")
    if len(images) == 0:
        raise UserError(f"{source}: holds no images")
    bad = (labels < 0) | (labels >= num_classes)
    if bad.any():
        raise UserError(f"{source}: label {labels[bad][0]} is outside [0, {num_classes}) "
                        f"(config.num_classes={num_classes})")
    return Split(images, labels.astype(np.int32), source)


def load_h5_split(path: Path, split: str, num_classes: int, image_size: int | None = 64) -> Split:
    """``{split}_set_x`` / ``{split}_set_y`` from one of the course's h5 files."""
    if not path.is_file():
        raise UserError(f"{path}: file not found")
    keys = (f"{split}_set_x", f"{split}_set_y")
    try:
        with h5py.File(path, "r") as f:
            missing = [k for k in keys if k not in f]
            if missing:
                raise UserError(f"{path}: missing dataset {missing[0]!r}; "
                                f"expected {list(keys)}, found {sorted(f)}")
            images, labels = f[keys[0]][()], f[keys[1]][()]
    except OSError as e:
        raise UserError(f"{path}: not a readable HDF5 file ({e})") from None
    return _check_split(images, labels, str(path), num_classes, image_size)


EXIF_ORIENTATION = 0x0112
_TURNED = (5, 6, 7, 8)  # orientations that swap width and height


def upright(image: Image.Image) -> Image.Image:
    """``image`` turned as its EXIF orientation says (a phone photo); itself, uncopied, without one."""
    if image.getexif().get(EXIF_ORIENTATION, 1) == 1:
        return image
    return ImageOps.exif_transpose(image)


def open_image(path, transform=None, name: str | None = None, reduction=None) -> Image.Image:
    """An image file (a path, or a file object named ``name`` in messages) decoded as an RGB PIL
    image; ``transform`` maps the PIL image first.

    ``reduction(width, height) -> k`` (k = 1, 2, 4 or 8), given the image's upright size before
    anything is decoded, lets a JPEG be decoded at 1/k of its size in each direction (libjpeg's
    DCT scaling, ``Image.draft``): k squared times fewer pixels to decode and to resize, for a
    caller that needs fewer (a small crop's worth). Other formats ignore it.

    A file PIL cannot decode, a truncated one, and one of more than ``Image.MAX_IMAGE_PIXELS``
    pixels (a decompression bomb: tiny on disk, gigabytes decoded) are each a UserError.
    """
    name = name or path
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as image:
                if reduction is not None:
                    width, height = image.size
                    turned = image.getexif().get(EXIF_ORIENTATION, 1) in _TURNED
                    k = reduction(*((height, width) if turned else (width, height)))
                    if k > 1 and image.format == "JPEG":
                        image.draft("RGB", (width // k, height // k))
                image = transform(image) if transform else image
                image = image if image.mode == "RGB" else image.convert("RGB")
                image.load()
                return image
    except (Image.DecompressionBombWarning, Image.DecompressionBombError) as e:
        raise UserError(f"{name}: image too large to decode safely ({e})") from None
    except (OSError, SyntaxError, ValueError) as e:
        raise UserError(f"{name}: not a readable image ({e})") from None


def read_image(path, transform=None, name: str | None = None) -> np.ndarray:
    """``open_image`` as uint8 RGB pixels (H, W, 3)."""
    return np.asarray(open_image(path, transform, name))


def load_jpg_split(folder: Path, num_classes: int, image_size: int | None = 64) -> Split:
    """A folder of ``{label}_IMG_{id}.jpg`` files, in file-name order (``image_size`` None: all of
    the first one's size)."""
    if not folder.is_dir():
        raise UserError(f"{folder}: folder not found")
    files = sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))
    images, labels = [], []
    for path in files:
        match = _JPEG_NAME.match(path.name)
        if not match:
            raise UserError(f"{path}: file name has no label; expected '{{label}}_IMG_{{id}}.jpg'")
        image = read_image(path)
        expected = (image_size, image_size, 3) if image_size is not None else (images or [image])[0].shape
        if image.shape != expected:
            raise UserError(f"{path}: image is {image.shape[1]}x{image.shape[0]}, "
                            f"expected {expected[1]}x{expected[0]}")
        images.append(image)
        labels.append(int(match.group(1)))
    if not images:
        raise UserError(f"{folder}: no '{{label}}_IMG_{{id}}.jpg' files")
    return _check_split(np.stack(images), np.asarray(labels), str(folder), num_classes, image_size)


CROP_FRACTION = 0.875  # ImageNet evaluation: the centre 224 of 256
PREPROCESSINGS = ("resize", "imagenet")


def resize_pil_image(image: Image.Image, size: int, preprocessing: str = "resize") -> Image.Image:
    """An RGB PIL image to (size, size): 'resize' scales the whole image (bilinear, with
    antialiasing); 'imagenet' is torchvision's ``Resize(round(size / 0.875))`` then
    ``CenterCrop(size)``: the shorter side to 256 for 224 (the longer one truncated, as
    torchvision does), the centre kept."""
    width, height = image.size
    if preprocessing == "resize":
        if (height, width) == (size, size):
            return image
        return image.resize((size, size), Image.Resampling.BILINEAR)
    if preprocessing != "imagenet":
        raise ValueError(f"preprocessing must be one of {PREPROCESSINGS}, got {preprocessing!r}")
    short = round(size / CROP_FRACTION)
    if height <= width:
        new_height, new_width = short, int(short * width / height)
    else:
        new_height, new_width = int(short * height / width), short
    resized = image.resize((new_width, new_height), Image.Resampling.BILINEAR)
    top, left = int(round((new_height - size) / 2.0)), int(round((new_width - size) / 2.0))
    return resized.crop((left, top, left + size, top + size))


def resize_image(image: np.ndarray, size: int, preprocessing: str = "resize") -> np.ndarray:
    """``resize_pil_image`` for uint8 RGB pixels (H, W, 3)."""
    if preprocessing == "resize" and image.shape[:2] == (size, size):
        return image
    return np.asarray(resize_pil_image(Image.fromarray(image), size, preprocessing))


def load_dataset(config, any_size: bool = False) -> Dataset:
    """Reads SIGNS as ``config`` says (data_dir, data_format, num_classes, image_size); with
    ``any_size``, images of another size than the config's are accepted (for ``resize_image``)."""
    image_size = None if any_size else config.image_size
    directory = find_data_dir(config.get("data_dir"), config.get("data_format", "auto"))
    use_h5 = config.get("data_format", "auto") == "h5" or (
        config.get("data_format", "auto") == "auto" and _holds_data(directory, "h5")
    )
    splits = {}
    for split in SPLITS:
        if use_h5:
            splits[split] = load_h5_split(directory / f"{split}_signs.h5", split, config.num_classes, image_size)
        else:
            splits[split] = load_jpg_split(directory / f"{split}_signs", config.num_classes, image_size)
    return Dataset(splits["train"], splits["test"], config.num_classes)


def _block_means(images: np.ndarray, block: int = 8) -> np.ndarray:
    n, h, w, c = images.shape
    return images.reshape(n, h // block, block, w // block, block, c).mean(axis=(2, 4), dtype=np.float32)


def unseen_test_examples(dataset: Dataset, tolerance: float = 7.0) -> np.ndarray:
    """Indices of the test examples that are not copies of a training example.

    SIGNS has 12 test images that are also training images: byte-identical files in the JPEG
    layout, but in the h5 layout each copy was JPEG-decoded separately, so the pixels differ by
    rounding. A copy is therefore a training image whose 8x8-block means all lie within
    ``tolerance`` grey levels (copies: at most 5.8 apart; the closest distinct photo: 8.6).
    """
    images_fit = dataset.test.images.shape[1] % 8 == 0 and dataset.test.images.shape[2] % 8 == 0
    if not images_fit:  # fall back to exact copies only
        seen = {image.tobytes() for image in dataset.train.images}
        return np.array([i for i, im in enumerate(dataset.test.images) if im.tobytes() not in seen], np.int64)
    train = _block_means(dataset.train.images).reshape(len(dataset.train), -1)
    test = _block_means(dataset.test.images).reshape(len(dataset.test), -1)
    unseen = [i for i, t in enumerate(test) if np.abs(train - t).max(axis=1).min() > tolerance]
    return np.array(unseen, np.int64)


# ---------------------------------------------------------------------------------------------
# Batching: every example once per epoch, in an order that depends on (seed, epoch) alone.


def epoch_order(seed: int, epoch: int, num_examples: int) -> np.ndarray:
    """The training examples' order in ``epoch``: a pure function of (seed, epoch)."""
    return np.random.default_rng([seed, epoch]).permutation(num_examples)


def batch_indices(order: np.ndarray, batch_size: int, num_batches: int | None = None
                  ) -> tuple[np.ndarray, np.ndarray]:
    """``order`` cut into batches, the last one padded (index 0) and masked out.

    Returns ``indices`` int32 (steps, batch_size) and ``mask`` bool (steps, batch_size): every
    example appears exactly once among the unmasked entries, so nothing is dropped.
    ``num_batches`` pads with fully masked batches up to that many (to reuse a compiled shape).
    """
    steps = max(-(-len(order) // batch_size), num_batches or 0)
    indices = np.zeros(steps * batch_size, np.int32)
    mask = np.zeros(steps * batch_size, bool)
    indices[: len(order)] = order
    mask[: len(order)] = True
    return indices.reshape(steps, batch_size), mask.reshape(steps, batch_size)


def augment(images: jnp.ndarray, key, max_shift: int = 4, flip: bool = True) -> jnp.ndarray:
    """Random shifts of up to ``max_shift`` pixels (zero fill) and horizontal flips, per example.

    Runs on the device inside the training step. A flipped hand shows the same number of fingers,
    so flips keep the label.
    """
    import jax  # the loaders above need only NumPy

    n, h, w, c = images.shape
    shift_key, flip_key = jax.random.split(key)
    padded = jnp.pad(images, ((0, 0), (max_shift, max_shift), (max_shift, max_shift), (0, 0)))
    offsets = jax.random.randint(shift_key, (n, 2), 0, 2 * max_shift + 1)
    crop = lambda image, offset: jax.lax.dynamic_slice(image, (offset[0], offset[1], 0), (h, w, c))
    images = jax.vmap(crop)(padded, offsets)
    if flip:
        flips = jax.random.bernoulli(flip_key, 0.5, (n, 1, 1, 1))
        images = jnp.where(flips, images[:, :, ::-1, :], images)
    return images
