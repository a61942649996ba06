"""Datasets beyond SIGNS: image folders (torchvision's ImageFolder convention), TFDS's checks, the
host-side preprocessing, and the streaming feed that decodes them."""

import sys

import h5py
import jax
import numpy as np
import pytest
from PIL import Image

from conftest import smoke_config, write_image_folder
from resnet_flax import datasets, feeds, input_pipeline, preprocessing, runtime
from resnet_flax.errors import UserError


def folder_config(root, **overrides):
    return smoke_config(**{"dataset": "imagefolder", "data_dir": str(root), "num_classes": 0, **overrides})


def test_classes_follow_sorted_folder_names_and_images_come_as_rgb(tmp_path):
    root = write_image_folder(tmp_path, classes=("zebra", "a dog", "Mouse"))
    sources = datasets.open_image_folder(str(root))
    assert sources.class_names == ["Mouse", "a dog", "zebra"]  # sorted as strings, as torchvision does
    assert len(sources.train) == 18 and len(sources.test) == 6
    shapes = set()
    for index in range(len(sources.train)):
        image, label = sources.train.read(index)
        image = np.asarray(image)
        assert image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3
        assert sources.train.files[index].parent.name == sources.class_names[label]
        shapes.add(image.shape)
    assert len(shapes) == 3  # each image at its own size
    config = datasets.with_num_classes(folder_config(root), sources)
    assert config.num_classes == 3


def test_exif_orientation_is_applied(tmp_path):
    root = write_image_folder(tmp_path, classes=("a", "b"), per_class=(1, 1))
    photo = root / "train" / "a" / "phone.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6  # rotated 90 degrees: stored landscape, shown portrait
    Image.new("RGB", (40, 20), (200, 10, 10)).save(photo, exif=exif)
    sources = datasets.open_image_folder(str(root))
    image, _ = sources.train.read(sources.train.files.index(photo))
    assert np.asarray(image).shape == (40, 20, 3)


@pytest.mark.parametrize("damage, message", [
    (lambda root: (root / "train").rename(root / "training"), "has no train/ folder"),
    (lambda root: (root / "test").rename(root / "elsewhere"), "has no test/ or val/ folder"),
    (lambda root: [p.unlink() for p in (root / "train" / "b").iterdir()], "b: class folder holds no images"),
    (lambda root: (root / "test" / "b").rename(root / "test" / "B"),
     "different classes (only in train/: ['b']; only in test/: ['B'])"),
])
def test_a_broken_image_folder_is_one_clear_error(tmp_path, damage, message):
    root = write_image_folder(tmp_path, classes=("a", "b"), per_class=(2, 1))
    damage(root)
    with pytest.raises(UserError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")
                       .replace("]", r"\]")):
        datasets.open_image_folder(str(root))


def test_val_stands_for_test_and_num_classes_must_match(tmp_path):
    root = write_image_folder(tmp_path, classes=("a", "b"), per_class=(2, 1))
    (root / "test").rename(root / "val")
    sources = datasets.open_image_folder(str(root))
    assert sources.test.description.endswith("val")
    with pytest.raises(UserError, match=r"config.num_classes=6, but .* has 2 classes \(a, b\)"):
        datasets.with_num_classes(folder_config(root, num_classes=6), sources)


def test_tfds_without_the_package_or_without_a_prepared_dataset(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "tensorflow_datasets", None)  # as if not installed
    with pytest.raises(UserError, match=r"needs the tensorflow-datasets package: pip install 'resnet_flax\[tfds\]'"):
        datasets.open_sources(smoke_config(dataset="tfds:imagenet2012", data_dir=str(tmp_path)))

    class Builder:  # tfds.builder's answer for a data_dir the dataset was never prepared in
        def is_prepared(self):
            return False

    fake = type(sys)("tensorflow_datasets")
    fake.builder = lambda name, data_dir: Builder()
    monkeypatch.setitem(sys.modules, "tensorflow_datasets", fake)
    with pytest.raises(UserError, match=f"not prepared in {tmp_path}"):
        datasets.open_sources(smoke_config(dataset="tfds:imagenet2012", data_dir=str(tmp_path)))
    with pytest.raises(UserError, match="config.dataset must be 'signs', 'imagefolder' or 'tfds:NAME'"):
        datasets.open_sources(smoke_config(dataset="tfds:"))


# ---------------------------------------------------------------------------------------------
# Preprocessing


def test_random_crop_boxes_stay_inside_and_within_the_area_and_ratio_ranges():
    rng = np.random.default_rng(0)
    for height, width in ((300, 500), (500, 300), (64, 64), (10, 400)):
        for _ in range(200):
            top, left, h, w = preprocessing.random_crop_box(height, width, rng)
            assert 0 <= top and top + h <= height and 0 <= left and left + w <= width and h > 0 and w > 0
            fallback = (h, w) in ((height, width), (height, int(round(height * 4 / 3))),
                                  (int(round(width * 4 / 3)), width))
            if not fallback:  # a drawn box: within torchvision's scale and ratio, up to rounding
                assert 0.08 * height * width * 0.9 <= h * w <= height * width
                assert 3 / 4 * 0.9 <= w / h <= 4 / 3 * 1.1


def test_random_resized_crop_flips_about_half_and_keeps_the_size():
    image = Image.fromarray(np.random.default_rng(1).integers(0, 256, (120, 90, 3), dtype=np.uint8))
    rng = np.random.default_rng(2)
    crops = [preprocessing.random_resized_crop(image, 32, rng) for _ in range(200)]
    assert all(c.shape == (32, 32, 3) and c.dtype == np.uint8 for c in crops)
    # The same draws without the flip: a crop is either equal to it or its mirror image.
    rng = np.random.default_rng(2)
    flipped = 0
    for crop in crops:
        top, left, h, w = preprocessing.random_crop_box(120, 90, rng)
        plain = np.asarray(image.resize((32, 32), Image.Resampling.BILINEAR, box=(left, top, left + w, top + h)))
        was_flipped = rng.random() < 0.5
        np.testing.assert_array_equal(crop, plain[:, ::-1] if was_flipped else plain)
        flipped += was_flipped
    assert 70 < flipped < 130


# ---------------------------------------------------------------------------------------------
# The streaming feed


def stream_epoch(feed, epoch, batch_size, train=True):
    """Every batch of an epoch through ``feed``, as host arrays (steps, batch, ...)."""
    order = input_pipeline.epoch_order(0, epoch, len(feed)) if train else np.arange(len(feed))
    indices, mask = input_pipeline.batch_indices(order, batch_size)
    parts = [jax.device_get(batches) for batches, _ in
             feed.chunks(indices, mask, feeds.chunked(len(indices), 4), 4, epoch=epoch, train=train)]
    return {name: np.concatenate([p[name] for p in parts])[:len(indices)] for name in ("image", "label", "mask")}


@pytest.fixture(scope="module")
def signs_as_png_folder(tmp_path_factory, signs_dir):
    """SIGNS written as an image folder of lossless PNGs from the h5 arrays, each file named by
    its h5 index."""
    root = tmp_path_factory.mktemp("signs_png")
    for split in ("train", "test"):
        with h5py.File(signs_dir / f"{split}_signs.h5") as f:
            images, labels = f[f"{split}_set_x"][()], f[f"{split}_set_y"][()]
        for index, (image, label) in enumerate(zip(images, labels)):
            folder = root / split / str(label)
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(image).save(folder / f"{index:04d}.png")
    return root


@pytest.mark.slow
def test_signs_as_an_image_folder_gives_the_h5_examples_in_the_same_order(signs_as_png_folder, signs_dir):
    h5 = input_pipeline.load_dataset(smoke_config(data_dir=str(signs_dir)))
    sources = datasets.open_image_folder(str(signs_as_png_folder))
    assert sources.class_names == [str(i) for i in range(6)]
    mesh = runtime.make_mesh()
    config = folder_config(signs_as_png_folder)
    feed = feeds.make_feed(sources.train, config, mesh)
    # The folder's example i is the h5's example h5_index[i]: the same pixels and label.
    h5_index = np.array([int(path.stem) for path in sources.train.files])
    assert sorted(h5_index) == list(range(len(h5.train)))
    streamed = stream_epoch(feed, epoch=3, batch_size=64)
    order = input_pipeline.epoch_order(0, 3, len(feed))
    indices, mask = input_pipeline.batch_indices(order, 64)
    expected_images = h5.train.images[h5_index[indices]]
    np.testing.assert_array_equal(streamed["mask"], mask)
    np.testing.assert_array_equal(streamed["image"][mask], expected_images[mask])
    np.testing.assert_array_equal(streamed["label"][mask], h5.train.labels[h5_index[indices]][mask])
    assert feed.decoded == len(h5.train)  # every example once; the padding is never decoded
    # The in-memory feed of the same examples gives the same batches in the same order, for a seed.
    in_memory = feeds.InMemoryFeed(input_pipeline.Split(h5.train.images[h5_index], h5.train.labels[h5_index],
                                                        "h5 in the folder's order"), mesh)
    np.testing.assert_array_equal(stream_epoch(in_memory, epoch=3, batch_size=64)["image"][mask],
                                  streamed["image"][mask])


def test_training_crops_depend_on_seed_epoch_and_example_not_on_threads(tmp_path):
    root = write_image_folder(tmp_path, per_class=(5, 1))
    sources = datasets.open_image_folder(str(root))
    mesh = runtime.make_mesh()

    def crops(threads, epoch):
        feed = feeds.StreamingFeed(sources.train, mesh, 16, "imagenet", seed=0, threads=threads)
        return stream_epoch(feed, epoch, batch_size=4)

    one, three = crops(1, epoch=1), crops(3, epoch=1)
    np.testing.assert_array_equal(one["image"], three["image"])
    assert not np.array_equal(one["image"], crops(1, epoch=2)["image"])


def test_undecodable_images_fail_naming_the_file_or_are_left_out_and_counted(tmp_path, capsys):
    root = write_image_folder(tmp_path, per_class=(4, 1))
    broken = root / "train" / "b" / "broken.jpg"
    broken.write_bytes(b"not a JPEG at all")
    sources = datasets.open_image_folder(str(root))
    mesh = runtime.make_mesh()
    failing = feeds.StreamingFeed(sources.train, mesh, 16, "resize", seed=0, threads=2)
    with pytest.raises(UserError, match=f"{broken}: not a readable image .*config.bad_images='skip'"):
        stream_epoch(failing, epoch=1, batch_size=4)
    skipping = feeds.StreamingFeed(sources.train, mesh, 16, "resize", seed=0, threads=2, bad_images="skip")
    batches = stream_epoch(skipping, epoch=1, batch_size=4)
    assert batches["mask"].sum() == len(sources.train) - 1  # masked out, as padding is
    skipping.report_skipped("epoch 1")
    assert f"epoch 1: left out 1 undecodable image(s), e.g. {broken}" in capsys.readouterr().err


def test_each_process_reads_only_its_devices_columns():
    """With the batch split over a mesh, a process's columns are those of its own devices; on one
    process that is every column, and the global array it builds is the plan's batch."""
    mesh = runtime.make_mesh()
    columns = feeds.local_columns(mesh, 8)
    np.testing.assert_array_equal(columns, np.arange(8))
    local = {"label": np.arange(24, dtype=np.int32).reshape(3, 8)}
    np.testing.assert_array_equal(jax.device_get(feeds.to_global(local, columns, 8, mesh)["label"]),
                                  local["label"])


def test_an_image_folder_trains_end_to_end_and_predict_and_evaluate_name_the_classes(tmp_path):
    from resnet_flax import evaluate, predict, pretrained, train

    root = write_image_folder(tmp_path / "data", classes=("red fox", "owl", "cat"), per_class=(8, 2))
    config = folder_config(root, image_size=32, batch_size=8, eval_batch_size=6, num_epochs=2,
                           bn_recalibration_batches=0, preprocessing="imagenet")
    summary = train.train_and_evaluate(config, tmp_path / "run")
    assert summary["class_names"] == ["cat", "owl", "red fox"] and summary["steps"] == 2 * 3
    assert "test_accuracy_unseen" not in summary  # SIGNS's duplicate check applies to SIGNS alone
    trained = pretrained.load(tmp_path / "run")
    assert trained.class_names == ["cat", "owl", "red fox"] and trained.config.num_classes == 3
    photo = root / "test" / "red fox" / "000.jpg"
    result = predict.classify(trained, [photo])[0]
    assert result["name"] == trained.class_names[result["class"]]
    assert predict.format_result(result).startswith(f"{photo}: class {result['name']} (p = ")
    report = evaluate.evaluate_checkpoint(tmp_path / "run")
    assert report["examples"] == 6 and report["class_examples"] == [2, 2, 2]
    assert abs(report["test_loss"] - summary["test_loss"]) < 1e-6
    matrix = np.asarray(report["confusion_matrix"])
    assert matrix.sum() == 6 and np.trace(matrix) == round(report["test_accuracy"] * 6)
    assert "red fox" in evaluate.format_report(report)


def test_a_large_jpeg_is_decoded_only_as_finely_as_its_crop_needs(tmp_path):
    """The same crop box (drawn before decoding) as from the full image, and about the same pixels:
    libjpeg's DCT scaling is a proper downsample, so the crop differs from the full decode resized
    by a little, not by content. A PNG is decoded whole and gives the same pixels exactly."""
    root = tmp_path / "data"
    for split in ("train", "test"):
        (root / split / "a").mkdir(parents=True)
    # A smooth photo-like picture, 8x the crop size that is asked for (sides not multiples of 8:
    # the decoded image's last pixel covers a partial block).
    yy, xx = np.mgrid[0:1203, 0:1605]
    photo = np.stack([128 + 100 * np.sin(xx / 97.0), 128 + 100 * np.cos(yy / 71.0),
                      128 + 60 * np.sin((xx + yy) / 131.0)], axis=-1).astype(np.uint8)
    Image.fromarray(photo).save(root / "train" / "a" / "big.jpg", quality=92)
    Image.fromarray(photo).save(root / "train" / "a" / "big.png")
    Image.fromarray(photo[:64, :64]).save(root / "test" / "a" / "small.png")
    sources = datasets.open_image_folder(str(root))
    feed = feeds.StreamingFeed(sources.train, runtime.make_mesh(), 32, "imagenet", seed=0, threads=1)
    reductions = []
    for index, path in enumerate(sources.train.files):
        full, _ = sources.train.read(index)
        for draw in range(20):
            pixels, _ = feed._random_crop(index, np.random.default_rng(draw))
            expected = preprocessing.random_resized_crop(full, 32, np.random.default_rng(draw))
            difference = np.abs(pixels.astype(int) - expected.astype(int))
            if path.suffix == ".png":
                np.testing.assert_array_equal(pixels, expected)
            else:
                box = preprocessing.random_crop_box(1203, 1605, np.random.default_rng(draw))
                reductions.append(preprocessing.dct_reduction(box, 32))
                assert difference.mean() < 3.0, (draw, box, difference.mean())
    assert max(reductions) == 8 and min(reductions) >= 2  # crops of >= 339 px: at least halved


@pytest.fixture(scope="module")
def tfds_dir(tmp_path_factory):
    """A small dataset prepared with TensorFlow Datasets in ArrayRecord format (no TensorFlow:
    the images are stored as uint8 tensors, which TFDS writes and decodes itself)."""
    tfds = pytest.importorskip("tensorflow_datasets")

    class TinyPhotos(tfds.core.GeneratorBasedBuilder):
        VERSION = tfds.core.Version("1.0.0")

        def _info(self):
            return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
                "image": tfds.features.Tensor(shape=(None, None, 3), dtype=np.uint8, encoding="bytes"),
                "label": tfds.features.ClassLabel(names=["cat", "red fox"])}))

        def _split_generators(self, dl_manager):
            return {"train": self._generate_examples(24, 0), "test": self._generate_examples(6, 1)}

        def _generate_examples(self, count, split):
            rng = np.random.default_rng(split)
            for i in range(count):
                label = i % 2
                pixels = np.clip(60 + 120 * label + rng.normal(0, 15, (20 + i % 5, 24, 3)), 0, 255)
                yield i, {"image": pixels.astype(np.uint8), "label": label}

    data_dir = tmp_path_factory.mktemp("tfds")
    TinyPhotos(data_dir=str(data_dir), file_format="array_record").download_and_prepare()
    return data_dir


@pytest.mark.slow
def test_a_prepared_tfds_dataset_trains_and_names_its_classes(tfds_dir, tmp_path):
    from resnet_flax import train

    config = smoke_config(dataset="tfds:tiny_photos", data_dir=str(tfds_dir), num_classes=0, image_size=16,
                          batch_size=8, eval_batch_size=6, num_epochs=1, bn_recalibration_batches=0)
    sources = datasets.open_sources(config)
    assert sources.class_names == ["cat", "red fox"] and (len(sources.train), len(sources.test)) == (24, 6)
    image, label = sources.train.read(0)
    assert image.mode == "RGB" and label in (0, 1)
    summary = train.train_and_evaluate(config, tmp_path / "run")
    assert summary["class_names"] == ["cat", "red fox"] and summary["steps"] == 3
    with pytest.raises(UserError, match=f"tfds:no_such_thing.*{tmp_path}"):
        datasets.open_sources(smoke_config(dataset="tfds:no_such_thing", data_dir=str(tmp_path), num_classes=0))
