"""Training end to end on the smoke config, determinism, masking, and the compiled steps."""

import json
import subprocess
import sys

import jax
import numpy as np
import pytest

from conftest import (REPO, assert_trees_equal, checkpoint_trees, needs_deterministic_runs,
                      smoke_config, write_signs_h5)
from resnet_flax import train


@pytest.fixture(scope="module")
def smoke_runs(smoke_run, tmp_path_factory):
    """configs/smoke.py trained twice from scratch in separate workdirs."""
    workdir = tmp_path_factory.mktemp("second")
    return [smoke_run, (workdir, train.train_and_evaluate(smoke_config(), workdir))]


def test_smoke_run_writes_every_output(smoke_runs):
    workdir, summary = smoke_runs[0]
    config = smoke_config()
    assert json.loads((workdir / "config.json").read_text())["model"] == "resnet_tiny"
    records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == list(range(1, config.num_epochs + 1))
    for record in records:
        assert set(record) == {"epoch", "train_loss", "train_accuracy", "test_loss", "test_accuracy",
                               "seconds", "images_per_second"}
        assert 0 <= record["train_accuracy"] <= 1 and np.isfinite(record["train_loss"])
    saved = json.loads((workdir / "summary.json").read_text())
    assert saved == summary
    assert saved["steps"] == config.num_epochs * 17  # 1080 = 16 x 64 + 56: the partial batch counts
    assert saved["test_accuracy"] == records[-1]["test_accuracy"]
    # BatchNorm re-estimation (configured in smoke.py) is reported beside the plain result.
    assert saved["bn_recalibration_batches"] == 17
    assert 0 <= saved["recalibrated_test_accuracy"] <= 1 and saved["recalibrated_test_loss"] != saved["test_loss"]
    assert saved["train_loss"] == records[-1]["train_loss"]
    assert len(saved["epoch_seconds"]) == config.num_epochs and saved["compile_seconds"] > 0
    assert saved["backend"] == jax.default_backend() and saved["device_count"] == jax.device_count()
    assert (workdir / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert list((workdir / "tensorboard").glob("events.out.tfevents.*"))
    # Each test example is counted exactly once: accuracy is a multiple of 1/120.
    assert abs(saved["test_accuracy"] * 120 - round(saved["test_accuracy"] * 120)) < 1e-9


@needs_deterministic_runs
def test_same_config_and_seed_give_identical_metrics(smoke_runs):
    (dir_a, a), (dir_b, b) = smoke_runs
    timing = {"epoch_seconds", "compile_seconds", "images_per_second"}
    assert {k: v for k, v in a.items() if k not in timing} == {k: v for k, v in b.items() if k not in timing}
    strip = lambda path: [{k: v for k, v in json.loads(line).items() if k not in ("seconds", "images_per_second")}
                          for line in (path / "metrics.jsonl").read_text().splitlines()]
    assert strip(dir_a) == strip(dir_b)
    assert_trees_equal(checkpoint_trees(dir_a), checkpoint_trees(dir_b))  # bitwise on one machine


@pytest.mark.parametrize("steps, limit, first, lengths", [
    (34, 16, None, [12, 11, 11]),
    (34, 16, 1, [1, 11, 11, 11]),
    (34, 17, None, [17, 17]),
    (17, 17, 1, [1, 16]),
    (5, 1, None, [1, 1, 1, 1, 1]),
    (1, 16, 1, [1]),
])
def test_chunk_lengths_cover_the_epoch_in_near_equal_calls(steps, limit, first, lengths):
    assert train.chunk_lengths(steps, limit, first) == lengths


def test_nan_loss_stops_training(tmp_path):
    config = smoke_config(learning_rate=1e38, num_epochs=1)  # weights overflow float32
    with pytest.raises(train.TrainingDiverged, match=r"training diverged: the loss is (nan|inf) in epoch 1"):
        train.train_and_evaluate(config, tmp_path)


def test_command_line_reports_bad_input_in_one_line(tmp_path):
    """A bad override, a missing data directory and corrupt data: one line each, exit status 1."""
    bad_h5 = write_signs_h5(tmp_path / "bad", train_set_x=np.zeros((48, 64, 64), np.uint8))
    cases = [
        (["--config.model=resnet51"], "config.model: unknown model 'resnet51'"),
        (["--config.batch_size=-4"], "config.batch_size must be in [1, 1080]"),
        ([f"--config.data_dir={tmp_path / 'missing'}"], f"config.data_dir={tmp_path / 'missing'}"),
        ([f"--config.data_dir={bad_h5}"], "train_signs.h5: images must have shape (N, 64, 64, 3)"),
    ]
    processes = [subprocess.Popen([sys.executable, "-m", "resnet_flax.main", "--config=configs/smoke.py",
                                   f"--workdir={tmp_path / f'run{i}'}", *overrides], cwd=REPO, text=True,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE)
                 for i, (overrides, _) in enumerate(cases)]  # independent: side by side
    for process, (_, message) in zip(processes, cases):
        result = subprocess.CompletedProcess(process.args, 0, *process.communicate(timeout=300))
        result.returncode = process.returncode
        assert result.returncode == 1, result.stderr
        assert result.stderr.strip().splitlines()[-1].startswith("error: "), result.stderr
        assert message in result.stderr
        assert "Traceback" not in result.stderr
