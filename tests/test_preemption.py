"""Step checkpoints and preemption: a run killed (SIGKILL) or stopped (SIGTERM) inside an epoch and
run again ends exactly as an uninterrupted run: the same parameters, optimizer state and metrics,
bit for bit, on the same machine."""

import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from conftest import REPO, checkpoint_trees, write_image_folder

pytestmark = pytest.mark.slow

STEP_EVERY = 3


def command(workdir, data_dir):
    # 6 batches of 8 per epoch; step checkpoints every 3 steps; epoch checkpoints only at the end,
    # so that a resume comes from within an epoch.
    return [sys.executable, "-m", "resnet_flax.main", "--config=configs/smoke.py", f"--workdir={workdir}",
            "--config.dataset=imagefolder", f"--config.data_dir={data_dir}", "--config.num_classes=0",
            "--config.image_size=32", "--config.preprocessing=imagenet", "--config.batch_size=8",
            "--config.eval_batch_size=8", "--config.steps_per_chunk=2", "--config.num_epochs=12",
            "--config.bn_recalibration_batches=0", "--config.checkpoint_every_epochs=100",
            f"--config.checkpoint_every_steps={STEP_EVERY}", "--config.data_threads=1"]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return write_image_folder(tmp_path_factory.mktemp("folder"), classes=("a", "b c", "d"), per_class=(16, 4))


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, data_dir):
    workdir = tmp_path_factory.mktemp("uninterrupted")
    result = subprocess.run(command(workdir, data_dir), cwd=REPO, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    return workdir


def start_and_wait_for_a_step_checkpoint(workdir, data_dir):
    process = subprocess.Popen(command(workdir, data_dir), cwd=REPO, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while not (workdir / "step_checkpoints" / str(STEP_EVERY)).is_dir():
        assert process.poll() is None, process.communicate()[1]
        assert time.monotonic() < deadline
        time.sleep(0.01)
    return process


def assert_same_run(workdir, reference):
    ours, theirs = checkpoint_trees(workdir), checkpoint_trees(reference)
    for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(theirs), strict=True):
        np.testing.assert_array_equal(a, b)
    records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    expected = [json.loads(line) for line in (reference / "metrics.jsonl").read_text().splitlines()]
    fields = ("epoch", "train_loss", "train_accuracy", "test_loss", "test_accuracy")
    assert [{k: r[k] for k in fields} for r in records] == [{k: r[k] for k in fields} for r in expected]


def test_killed_inside_an_epoch_resumes_at_the_next_batch_and_ends_bit_identical(tmp_path, data_dir,
                                                                                 uninterrupted):
    workdir = tmp_path / "killed"
    process = start_and_wait_for_a_step_checkpoint(workdir, data_dir)
    process.send_signal(signal.SIGSTOP)  # frozen at once, then killed: no chance to clean up
    process.kill()
    process.communicate()
    assert not (workdir / "summary.json").exists()  # it was stopped before the end
    result = subprocess.run(command(workdir, data_dir), cwd=REPO, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    assert "Resuming from" in result.stdout and "step_checkpoints" in result.stdout and "after batch" in result.stdout
    assert_same_run(workdir, uninterrupted)


def test_sigterm_saves_at_the_step_reached_exits_non_zero_and_resumes(tmp_path, data_dir, uninterrupted):
    workdir = tmp_path / "terminated"
    process = start_and_wait_for_a_step_checkpoint(workdir, data_dir)
    process.send_signal(signal.SIGTERM)
    _, err = process.communicate(timeout=120)
    assert process.returncode == 128 + signal.SIGTERM
    line = [line for line in err.splitlines() if line.startswith("error: stopped by SIGTERM")]
    assert line and "rerun the same command to resume" in line[0], err
    step = int(line[0].split(" at step ")[1].split()[0])
    assert step >= STEP_EVERY
    saved = workdir / "step_checkpoints" / str(step)
    assert f"checkpoint {saved}" in line[0] and saved.is_dir()
    result = subprocess.run(command(workdir, data_dir), cwd=REPO, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    assert f"step_checkpoints/{step}" in result.stdout
    assert_same_run(workdir, uninterrupted)


def test_a_second_signal_stops_at_once_and_leaves_the_checkpoints_as_they_were(tmp_path, data_dir):
    workdir = tmp_path / "twice"
    process = start_and_wait_for_a_step_checkpoint(workdir, data_dir)
    os.kill(process.pid, signal.SIGINT)
    os.kill(process.pid, signal.SIGINT)
    process.communicate(timeout=120)
    assert process.returncode in (-signal.SIGINT, 128 + signal.SIGINT)
    # Whatever it had saved is complete: a rerun resumes from it and finishes.
    result = subprocess.run(command(workdir, data_dir), cwd=REPO, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    assert "Resuming from" in result.stdout


def test_two_processes_stop_together_when_one_is_signalled(tmp_path, data_dir):
    """SIGTERM to one process of two: both stop at the same step (they agree before each call),
    save one checkpoint there together, exit non-zero; the same commands again resume and finish."""
    workdir = tmp_path / "pair"
    port = socket_port()

    def start(i):
        return subprocess.Popen([*command(workdir, data_dir), f"--coordinator_address=127.0.0.1:{port}",
                                 "--num_processes=2", f"--process_id={i}"],
                                cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    processes = [start(0), start(1)]
    deadline = time.monotonic() + 300
    while not (workdir / "step_checkpoints" / str(STEP_EVERY)).is_dir():
        assert all(p.poll() is None for p in processes) and time.monotonic() < deadline
        time.sleep(0.01)
    processes[1].send_signal(signal.SIGTERM)
    errors = [p.communicate(timeout=120)[1] for p in processes]
    steps = []
    for process, err in zip(processes, errors):
        assert process.returncode == 128 + signal.SIGTERM, err
        line = next(line for line in err.splitlines() if line.startswith("error: stopped by SIGTERM"))
        steps.append(int(line.split(" at step ")[1].split()[0]))
    assert steps[0] == steps[1]
    assert (workdir / "step_checkpoints" / str(steps[0])).is_dir()
    port = socket_port()
    processes = [start(0), start(1)]
    outputs = [p.communicate(timeout=300) for p in processes]
    assert all(p.returncode == 0 for p in processes), outputs[0][1] + outputs[1][1]
    assert f"step_checkpoints/{steps[0]}" in outputs[0][0]
    assert json.loads((workdir / "summary.json").read_text())["steps"] == 12 * 6


def socket_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
