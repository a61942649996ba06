"""What a run trains on, chosen by ``config.dataset``: each split as a random-access source of
(image, label) examples, and the class names.

- ``'signs'``: the course's SIGNS (``input_pipeline.load_dataset``: h5 files or JPEG folders),
  14 MB, held in memory at the model's size.
- ``'imagefolder'``: ``config.data_dir`` holds ``train/`` and ``test/`` (or ``val/``), each with one
  folder per class, torchvision's ``ImageFolder`` convention: class names sorted, label = index,
  JPEG/PNG/BMP/WebP files of any size and colour mode. Only the file list is held; images are
  decoded when a batch needs them.
- ``'tfds:NAME'``: a TensorFlow Datasets dataset already prepared in ``config.data_dir`` in
  ArrayRecord format, read through ``tfds.data_source`` (the ``tfds`` extra; no TensorFlow, and
  nothing is downloaded).

A streamed source's ``read(index)`` gives the image, decoded as an RGB PIL image of its own size, upright
by its EXIF orientation, and its label; an image that cannot be decoded raises a ``UserError``
naming it. ``read(index, reduction)`` first calls ``reduction(width, height)`` and may decode a
JPEG that many times smaller (``input_pipeline.open_image``).
"""

import dataclasses
import io
from pathlib import Path

import numpy as np
from PIL import Image

from resnet_flax import input_pipeline
from resnet_flax.errors import UserError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
TEST_FOLDERS = ("test", "val")  # the first that exists is the evaluation split
TFDS_PREFIX = "tfds:"


class ArraySource:
    """A split held in memory (``input_pipeline.Split``), already at the model's size: nothing to
    read one by one, the in-memory feed gathers its rows."""

    in_memory = True

    def __init__(self, split: input_pipeline.Split):
        self.split, self.description = split, split.source

    def __len__(self) -> int:
        return len(self.split)


class ImageFolderSource:
    """The image files of one split folder (``<split>/<class>/<file>``), in sorted order."""

    in_memory = False

    def __init__(self, folder: Path, files: list[Path], labels: np.ndarray):
        self.folder, self.files, self.labels = folder, files, labels
        self.description = str(folder)

    def __len__(self) -> int:
        return len(self.files)

    def read(self, index: int, reduction=None) -> tuple[Image.Image, int]:
        image = input_pipeline.open_image(self.files[index], transform=input_pipeline.upright, reduction=reduction)
        return image, int(self.labels[index])


class TfdsSource:
    """One split of a prepared TFDS dataset, its images decoded here (not by TensorFlow)."""

    in_memory = False

    def __init__(self, data_source, description: str):
        self._source, self.description = data_source, description

    def __len__(self) -> int:
        return len(self._source)

    def read(self, index: int, reduction=None) -> tuple[Image.Image, int]:
        record = self._source[index]
        image = record["image"]
        if isinstance(image, bytes):
            image = input_pipeline.open_image(io.BytesIO(image), transform=input_pipeline.upright,
                                              name=f"{self.description}[{index}]", reduction=reduction)
        else:  # decoded by TFDS after all: (H, W, C) pixels
            image = np.asarray(image)
            image = Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image).convert("RGB")
            if reduction is not None:
                reduction(*image.size)
        return image, int(record["label"])


@dataclasses.dataclass(frozen=True)
class Sources:
    train: ArraySource | ImageFolderSource | TfdsSource
    test: ArraySource | ImageFolderSource | TfdsSource
    class_names: list[str]

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


# ---------------------------------------------------------------------------------------------
# Image folders


def _class_folders(split_dir: Path) -> list[Path]:
    return sorted((p for p in split_dir.iterdir() if p.is_dir() and not p.name.startswith(".")),
                  key=lambda p: p.name)


def scan_split(split_dir: Path) -> tuple[list[str], list[Path], np.ndarray]:
    """Class names (sorted folder names), the image files (class by class, each class's files
    sorted by name) and their labels."""
    classes = _class_folders(split_dir)
    if not classes:
        raise UserError(f"{split_dir}: holds no class folders; expected {split_dir}/<class name>/<image files>")
    files, labels = [], []
    for label, folder in enumerate(classes):
        images = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
                        and not p.name.startswith("."))
        if not images:
            raise UserError(f"{folder}: class folder holds no images ({', '.join(IMAGE_SUFFIXES)})")
        files += images
        labels += [label] * len(images)
    return [c.name for c in classes], files, np.asarray(labels, np.int32)


def open_image_folder(data_dir: str) -> Sources:
    """``data_dir/train`` and ``data_dir/test`` (or ``val``), which must name the same classes."""
    if not data_dir:
        raise UserError("config.dataset='imagefolder' needs config.data_dir: a folder holding train/ and test/ "
                        "(or val/), each with one folder per class")
    root = Path(data_dir).expanduser()
    if not root.is_dir():
        raise UserError(f"config.data_dir={data_dir}: folder not found")
    train_dir = root / "train"
    if not train_dir.is_dir():
        raise UserError(f"{root}: has no train/ folder (expected train/ and test/ or val/, each with one "
                        "folder per class)")
    test_dir = next((root / name for name in TEST_FOLDERS if (root / name).is_dir()), None)
    if test_dir is None:
        raise UserError(f"{root}: has no test/ or val/ folder beside train/")
    train_classes, train_files, train_labels = scan_split(train_dir)
    test_classes, test_files, test_labels = scan_split(test_dir)
    if train_classes != test_classes:
        only_train = sorted(set(train_classes) - set(test_classes))
        only_test = sorted(set(test_classes) - set(train_classes))
        raise UserError(f"{root}: train/ and {test_dir.name}/ have different classes (only in train/: "
                        f"{only_train or 'none'}; only in {test_dir.name}/: {only_test or 'none'})")
    return Sources(ImageFolderSource(train_dir, train_files, train_labels),
                   ImageFolderSource(test_dir, test_files, test_labels), train_classes)


# ---------------------------------------------------------------------------------------------
# TensorFlow Datasets


def open_tfds(name: str, data_dir: str) -> Sources:
    """The train split and the test split (else ``validation``) of a prepared TFDS dataset."""
    try:
        import tensorflow_datasets as tfds
    except ImportError:
        raise UserError(f"config.dataset='{TFDS_PREFIX}{name}' needs the tensorflow-datasets package: "
                        "pip install 'resnet_flax[tfds]'") from None
    if not data_dir:
        raise UserError(f"config.dataset='{TFDS_PREFIX}{name}' needs config.data_dir: the TFDS data directory "
                        "the dataset was prepared in (nothing is downloaded)")
    try:
        builder = tfds.builder(name, data_dir=data_dir)
    except Exception as e:  # an unknown name, a broken dataset_info.json, ...
        first_line = (str(e).strip().splitlines() or [""])[0]
        raise UserError(f"config.dataset='{TFDS_PREFIX}{name}' with data_dir {data_dir}: {type(e).__name__}: "
                        f"{first_line}") from None
    if not builder.is_prepared():
        raise UserError(f"config.dataset='{TFDS_PREFIX}{name}': not prepared in {data_dir} (prepare it there "
                        f"first, e.g. tfds build {name} --data_dir={data_dir} --file_format=array_record)")
    splits = builder.info.splits
    test_split = next((s for s in ("test", "validation") if s in splits), None)
    if "train" not in splits or test_split is None:
        raise UserError(f"{TFDS_PREFIX}{name} in {data_dir}: needs a train split and a test or validation "
                        f"split, has {sorted(splits)}")
    features = builder.info.features
    if "image" not in features or "label" not in features:
        raise UserError(f"{TFDS_PREFIX}{name}: needs 'image' and 'label' features, has {sorted(features)}")
    # An Image feature's encoded bytes are decoded by PIL in the feed's threads (a JPEG at the
    # scale its crop needs); other features (arrays) are decoded by TFDS.
    image_feature = isinstance(features["image"], tfds.features.Image)
    decoders = {"image": tfds.decode.SkipDecoding()} if image_feature else None

    def source(split: str) -> TfdsSource:
        try:
            data = tfds.data_source(name, split=split, data_dir=data_dir, download=False, decoders=decoders)
        except Exception as e:  # not in ArrayRecord format, files missing, ...
            raise UserError(f"{TFDS_PREFIX}{name} in {data_dir}, split {split}: cannot be read as an ArrayRecord "
                            f"data source ({type(e).__name__}: {e})") from None
        return TfdsSource(data, f"{TFDS_PREFIX}{name}/{split} in {data_dir}")

    return Sources(source("train"), source(test_split), list(features["label"].names))


# ---------------------------------------------------------------------------------------------


def validate_dataset_name(dataset: str) -> None:
    if dataset in ("signs", "imagefolder") or (dataset.startswith(TFDS_PREFIX) and dataset[len(TFDS_PREFIX):]):
        return
    raise UserError(f"config.dataset must be 'signs', 'imagefolder' or 'tfds:NAME', got {dataset!r}")


def open_sources(config) -> Sources:
    """The splits ``config.dataset`` names."""
    dataset = config.dataset
    validate_dataset_name(dataset)
    if dataset == "imagefolder":
        return open_image_folder(config.data_dir)
    if dataset.startswith(TFDS_PREFIX):
        return open_tfds(dataset[len(TFDS_PREFIX):], config.data_dir)
    if config.num_classes == 0:
        raise UserError("config.num_classes=0 (as many as the data has) applies to image folders and TFDS; "
                        "for SIGNS set its number of classes (6)")
    signs = input_pipeline.load_dataset(config)
    return Sources(ArraySource(signs.train), ArraySource(signs.test),
                   [str(i) for i in range(signs.num_classes)])


def with_num_classes(config, sources: Sources):
    """``config`` with ``num_classes`` from the data: 0 means "as many as there are classes"; any
    other number must match (SIGNS's names are its config's classes, its labels checked on load)."""
    if config.num_classes == 0:
        config = config.copy_and_resolve_references()
        config.num_classes = sources.num_classes
    elif config.num_classes != sources.num_classes:
        names = ", ".join(sources.class_names[:8]) + (", ..." if sources.num_classes > 8 else "")
        raise UserError(f"config.num_classes={config.num_classes}, but {sources.train.description} has "
                        f"{sources.num_classes} classes ({names}); set config.num_classes={sources.num_classes} "
                        "or 0 (as many as the data has)")
    return config
