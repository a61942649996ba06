"""Loading SIGNS from both layouts, the data directory search, bad input, and batching."""

from pathlib import Path

import numpy as np
import pytest

from conftest import write_signs_h5
from resnet_flax import input_pipeline as ip
from resnet_flax.errors import UserError


def test_h5_layout(signs_dir):
    train = ip.load_h5_split(signs_dir / "train_signs.h5", "train", 6)
    test = ip.load_h5_split(signs_dir / "test_signs.h5", "test", 6)
    assert train.images.shape == (1080, 64, 64, 3) and train.images.dtype == np.uint8
    assert test.images.shape == (120, 64, 64, 3)
    np.testing.assert_array_equal(np.bincount(train.labels), [180] * 6)
    np.testing.assert_array_equal(np.bincount(test.labels), [20] * 6)


def test_jpeg_layout_holds_the_same_test_set(signs_dir, signs_jpg_dir):
    h5 = ip.load_h5_split(signs_dir / "test_signs.h5", "test", 6)
    jpg = ip.load_jpg_split(signs_jpg_dir / "test_signs", 6)
    assert jpg.images.shape == h5.images.shape
    # The two layouts decode to pixels a few levels apart (JPEG rounding), so match each JPEG to
    # its nearest h5 image and check that it is close and carries the same label.
    distance = np.abs(jpg.images[:, None].astype(np.int16) - h5.images[None]).mean(axis=(2, 3, 4))
    nearest = distance.argmin(axis=1)
    assert distance.min(axis=1).max() < 8
    np.testing.assert_array_equal(h5.labels[nearest], jpg.labels)


def test_normalize_is_pixels_over_255():
    pixels = np.array([[0, 51, 255]], np.uint8)
    np.testing.assert_allclose(ip.normalize(pixels), [[0.0, 0.2, 1.0]])


class TestDataDirectorySearch:
    def test_default_finds_shared_signs_next_to_the_repository(self, monkeypatch, tmp_path, signs_dir):
        monkeypatch.chdir(tmp_path)
        monkeypatch.delenv(ip.DATA_DIR_ENV, raising=False)
        assert ip.find_data_dir("").resolve() == signs_dir.resolve()

    def test_local_datasets_folder_comes_before_shared(self, monkeypatch, tmp_path):
        monkeypatch.chdir(tmp_path)
        monkeypatch.delenv(ip.DATA_DIR_ENV, raising=False)
        write_signs_h5(tmp_path / "datasets")
        assert ip.find_data_dir("") == Path("datasets")

    def test_environment_variable_then_config_take_precedence(self, monkeypatch, tmp_path):
        env_dir, config_dir = write_signs_h5(tmp_path / "env"), write_signs_h5(tmp_path / "cfg")
        monkeypatch.setenv(ip.DATA_DIR_ENV, str(env_dir))
        assert ip.find_data_dir("") == env_dir
        assert ip.find_data_dir(str(config_dir)) == config_dir

    def test_jpeg_folders_are_found_too(self, signs_jpg_dir):
        assert ip.find_data_dir(str(signs_jpg_dir)) == signs_jpg_dir
        with pytest.raises(UserError, match="config.data_dir"):
            ip.find_data_dir(str(signs_jpg_dir), "h5")

    def test_explicit_directory_without_data_is_an_error(self, tmp_path):
        with pytest.raises(UserError, match=f"config.data_dir={tmp_path}: expected a directory with"):
            ip.find_data_dir(str(tmp_path))

    def test_nothing_found_says_where_it_looked(self, monkeypatch, tmp_path):
        monkeypatch.chdir(tmp_path)
        monkeypatch.delenv(ip.DATA_DIR_ENV, raising=False)
        monkeypatch.setattr(ip, "DEFAULT_SEARCH_PATH", (Path("datasets"), tmp_path / "nowhere"))
        with pytest.raises(UserError, match=r"looked in .*datasets, .*nowhere.*SIGNS_DATA_DIR"):
            ip.find_data_dir("")


class TestBadInput:
    def test_missing_file(self, tmp_path):
        with pytest.raises(UserError, match="train_signs.h5: file not found"):
            ip.load_h5_split(tmp_path / "train_signs.h5", "train", 6)

    def test_not_hdf5(self, tmp_path):
        path = tmp_path / "train_signs.h5"
        path.write_bytes(b"definitely not hdf5")
        with pytest.raises(UserError, match="not a readable HDF5 file"):
            ip.load_h5_split(path, "train", 6)

    def test_missing_key(self, tmp_path):
        write_signs_h5(tmp_path, train_set_y=None)
        with pytest.raises(UserError, match="missing dataset 'train_set_y'"):
            ip.load_h5_split(tmp_path / "train_signs.h5", "train", 6)

    def test_wrong_image_shape(self, tmp_path):
        write_signs_h5(tmp_path, train_set_x=np.zeros((48, 32, 32, 3), np.uint8))
        with pytest.raises(UserError, match=r"shape \(N, 64, 64, 3\), got \(48, 32, 32, 3\)"):
            ip.load_h5_split(tmp_path / "train_signs.h5", "train", 6)

    def test_wrong_image_dtype(self, tmp_path):
        write_signs_h5(tmp_path, train_set_x=np.zeros((48, 64, 64, 3), np.float32))
        with pytest.raises(UserError, match="must be uint8 pixels, got dtype float32"):
            ip.load_h5_split(tmp_path / "train_signs.h5", "train", 6)

    def test_label_out_of_range(self, tmp_path):
        labels = np.zeros(48, np.int64)
        labels[5] = 6
        write_signs_h5(tmp_path, train_set_y=labels)
        with pytest.raises(UserError, match=r"label 6 is outside \[0, 6\)"):
            ip.load_h5_split(tmp_path / "train_signs.h5", "train", 6)

    def test_labels_count_differs_from_images(self, tmp_path):
        write_signs_h5(tmp_path, train_set_y=np.zeros(47, np.int64))
        with pytest.raises(UserError, match="labels must be 48 integers"):
            ip.load_h5_split(tmp_path / "train_signs.h5", "train", 6)

    def _jpeg_folder(self, tmp_path, signs_jpg_dir, count=3):
        folder = tmp_path / "train_signs"
        folder.mkdir()
        for source in sorted((signs_jpg_dir / "test_signs").iterdir())[:count]:
            (folder / source.name).write_bytes(source.read_bytes())
        return folder

    def test_jpeg_without_label_in_name(self, tmp_path, signs_jpg_dir):
        folder = self._jpeg_folder(tmp_path, signs_jpg_dir)
        (folder / "IMG_1234.jpg").write_bytes((next(folder.iterdir())).read_bytes())
        with pytest.raises(UserError, match="IMG_1234.jpg: file name has no label"):
            ip.load_jpg_split(folder, 6)

    def test_corrupt_jpeg(self, tmp_path, signs_jpg_dir):
        folder = self._jpeg_folder(tmp_path, signs_jpg_dir)
        good = next(folder.iterdir()).read_bytes()
        (folder / "3_IMG_9999.jpg").write_bytes(good[: len(good) // 3])
        with pytest.raises(UserError, match="3_IMG_9999.jpg: not a readable image"):
            ip.load_jpg_split(folder, 6)

    def test_jpeg_of_the_wrong_size(self, tmp_path, signs_jpg_dir):
        from PIL import Image

        folder = self._jpeg_folder(tmp_path, signs_jpg_dir)
        Image.new("RGB", (80, 60)).save(folder / "2_IMG_1.jpg")
        with pytest.raises(UserError, match="2_IMG_1.jpg: image is 80x60, expected 64x64"):
            ip.load_jpg_split(folder, 6)

    def test_jpeg_folder_loads_in_name_order(self, tmp_path, signs_jpg_dir):
        folder = self._jpeg_folder(tmp_path, signs_jpg_dir, count=25)
        split = ip.load_jpg_split(folder, 6)
        names = sorted(p.name for p in folder.iterdir())
        np.testing.assert_array_equal(split.labels, [int(n.split("_")[0]) for n in names])


def test_epoch_order_depends_on_seed_and_epoch_alone():
    order = ip.epoch_order(0, 1, 1080)
    np.testing.assert_array_equal(np.sort(order), np.arange(1080))
    np.testing.assert_array_equal(order, ip.epoch_order(0, 1, 1080))
    assert not np.array_equal(order, ip.epoch_order(0, 2, 1080))
    assert not np.array_equal(order, ip.epoch_order(1, 1, 1080))


def test_batches_use_every_example_once():
    order = ip.epoch_order(0, 1, 1080)
    indices, mask = ip.batch_indices(order, 32)
    assert indices.shape == mask.shape == (34, 32)  # 1080 = 33 x 32 + 24
    assert mask[:33].all() and mask[33].sum() == 24
    np.testing.assert_array_equal(np.sort(indices[mask]), np.arange(1080))


def test_augmentation_keeps_shape_and_varies_with_the_key():
    import jax

    images = ip.normalize(np.random.default_rng(0).integers(0, 256, (4, 16, 16, 3), dtype=np.uint8))
    a = ip.augment(images, jax.random.key(0))
    b = ip.augment(images, jax.random.key(1))
    assert a.shape == images.shape
    assert not np.allclose(a, b)
    np.testing.assert_array_equal(a, ip.augment(images, jax.random.key(0)))


def test_unseen_test_examples_leave_out_exactly_the_copies_of_training_images(signs_dir, signs_jpg_dir):
    from resnet_flax.config import default_config

    config = default_config()
    h5 = ip.load_dataset(config)
    unseen = ip.unseen_test_examples(h5)
    assert len(unseen) == 108  # the data README: 12 of the 120 test images are training images
    # The JPEG layout holds the same copies byte for byte: its exact duplicates, mapped to the h5
    # test images they are, must be exactly the ones left out.
    config.data_dir = str(signs_jpg_dir)
    jpg = ip.load_dataset(config)
    jpg_unseen = ip.unseen_test_examples(jpg)
    seen = {image.tobytes() for image in jpg.train.images}
    exact_copies = [i for i, image in enumerate(jpg.test.images) if image.tobytes() in seen]
    assert len(exact_copies) == 12 and sorted(set(range(120)) - set(jpg_unseen)) == exact_copies
    h5_index = [np.abs(h5.test.images.astype(np.int16) - jpg.test.images[i]).mean(axis=(1, 2, 3)).argmin()
                for i in exact_copies]
    assert sorted(set(range(120)) - set(unseen)) == sorted(h5_index)
