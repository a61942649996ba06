"""predict: your own image files classified with exactly the training preprocessing."""

import json
import struct
import subprocess
import sys
import zlib

import numpy as np
import pytest
from PIL import Image

from conftest import REPO
from resnet_flax import input_pipeline, predict, pretrained
from resnet_flax.errors import UserError


@pytest.fixture(scope="module")
def trained(smoke_run):
    return pretrained.load(smoke_run[0])


@pytest.fixture(scope="module")
def test_split(signs_dir):
    return input_pipeline.load_h5_split(signs_dir / "test_signs.h5", "test", 6)


def test_png_files_classify_exactly_as_evaluation(trained, test_split, tmp_path):
    paths = []
    for i in range(12):
        path = tmp_path / f"test_{i}.png"
        Image.fromarray(test_split.images[i]).save(path)
        paths.append(path)
    results = predict.classify(trained, paths)
    expected = trained.probabilities(test_split.images[:12])
    np.testing.assert_allclose([r["probabilities"] for r in results], expected, rtol=1e-6, atol=1e-7)
    assert [r["class"] for r in results] == list(np.argmax(expected, axis=1))


def test_jpeg_and_other_sizes_and_modes(trained, test_split, tmp_path):
    image = Image.fromarray(test_split.images[0])
    image.save(tmp_path / "same.jpg", quality=98)
    image.resize((256, 256), Image.Resampling.NEAREST).save(tmp_path / "big.png")
    image.convert("L").save(tmp_path / "grey.png")
    image.convert("RGBA").save(tmp_path / "alpha.png")
    results = predict.classify(trained, [tmp_path / n for n in ("same.jpg", "big.png", "grey.png", "alpha.png")])
    reference = trained.probabilities(test_split.images[:1])[0]
    for result in results:
        assert "error" not in result, result
        assert abs(sum(result["probabilities"]) - 1) < 1e-5
    # JPEG rounding and a nearest-neighbour round trip through 256x256 barely move the output.
    np.testing.assert_allclose(results[0]["probabilities"], reference, atol=0.02)
    np.testing.assert_allclose(results[1]["probabilities"], reference, atol=0.02)


def test_exif_orientation_is_applied(tmp_path):
    pixels = np.zeros((32, 64, 3), np.uint8)
    pixels[:, :32] = 255  # stored: left half white
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    Image.fromarray(pixels).save(tmp_path / "phone.jpg", exif=exif, quality=100)
    upright = predict.load_image(tmp_path / "phone.jpg", 64)
    # Rotated clockwise, the white left half becomes the top half.
    assert upright[:28].mean() > 200 and upright[36:].mean() < 50


def huge_png(path, side=100_000):
    """A valid PNG header claiming side x side pixels: a few bytes on disk, 30 GB decoded."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    header = struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b""))
    return path


def bad_files(tmp_path, signs_jpg_dir):
    good = sorted((signs_jpg_dir / "test_signs").iterdir())[0]
    truncated = tmp_path / "truncated.jpg"
    data = good.read_bytes()
    truncated.write_bytes(data[: len(data) // 2])
    text = tmp_path / "notes.jpg"
    text.write_text("not an image")
    return {
        "missing": (tmp_path / "missing.jpg", "file not found"),
        "not an image": (text, "not a readable image"),
        "truncated": (truncated, "not a readable image"),
        "bomb": (huge_png(tmp_path / "bomb.png"), "too large to decode safely"),
    }, good


def test_bad_files_get_their_own_error_and_the_rest_are_classified(trained, tmp_path, signs_jpg_dir):
    bad, good = bad_files(tmp_path, signs_jpg_dir)
    for path, message in bad.values():
        with pytest.raises(UserError, match=message):
            predict.load_image(path, 64)
    results = predict.classify(trained, [good, *(p for p, _ in bad.values()), good])
    assert "class" in results[0] and "class" in results[-1]
    assert [("error" in r) for r in results] == [False, True, True, True, True, False]


def test_command_line(smoke_run, tmp_path, signs_jpg_dir):
    bad, good = bad_files(tmp_path, signs_jpg_dir)
    command = [sys.executable, "-m", "resnet_flax.predict", f"--workdir={smoke_run[0]}"]
    ok = subprocess.run([*command, str(good), str(REPO.parent / "shared/data/own_images/2.jpg")],
                        cwd=REPO, capture_output=True, text=True, timeout=300)
    assert ok.returncode == 0, ok.stderr
    assert "class" in ok.stdout and "p(0)..p(5)" in ok.stdout
    mixed = subprocess.run([*command, "--json", str(good), str(bad["truncated"][0]), str(bad["bomb"][0])],
                           cwd=REPO, capture_output=True, text=True, timeout=300)
    assert mixed.returncode == 1
    lines = [json.loads(line) for line in mixed.stdout.strip().splitlines()]
    assert [set(line) - {"file"} for line in lines] == [{"class", "name", "probabilities"}, {"error"}, {"error"}]
