"""Data parallelism with JAX's own machinery: 4 devices equal 1, and two processes equal one."""

import json
import os
import socket
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest

from conftest import REPO, checkpoint_trees, smoke_config, write_image_folder
from resnet_flax import input_pipeline, pretrained, train

# Runs in a subprocess with 4 CPU devices: three training steps of the tiny model on a mesh of one
# device and on a mesh of four, both from the same state and batches.
FOUR_DEVICES_SCRIPT = textwrap.dedent("""
    import sys
    import jax, numpy as np
    sys.path.insert(0, "tests")
    from conftest import smoke_config
    from resnet_flax import input_pipeline, models, runtime, steps
    from resnet_flax.errors import UserError

    assert jax.device_count() == 4
    config = smoke_config(batch_size=16)
    split = input_pipeline.load_dataset(config).train
    model = models.create_model(config.model, num_classes=6)
    fresh = jax.device_get(steps.create_train_state(config, model, steps_per_epoch=10))  # host copy: steps donate
    indices, mask = input_pipeline.batch_indices(input_pipeline.epoch_order(0, 1, 40), 16)  # 16, 16, 8 + 8 padding
    results = {}
    for name, devices in (("one", jax.devices()[:1]), ("four", jax.devices())):
        mesh = runtime.make_mesh(devices)
        state = jax.device_put(fresh, runtime.replicated(mesh))
        batches = runtime.gather_batches(split.images, split.labels, indices, mask, mesh)
        assert len(batches["image"].sharding.device_set) == len(devices)
        state, sums = steps.make_train_chunk(config)(state, batches)
        variables = {"params": state.params, "batch_stats": state.batch_stats}
        flat = jax.tree_util.tree_leaves_with_path(jax.device_get(variables))
        results.update({f"{name}:{jax.tree_util.keystr(p)}": np.asarray(v) for p, v in flat})
        results[f"{name}:loss_sum"] = np.asarray(sums["loss_sum"])
    np.savez(sys.argv[1], **results)
    try:
        runtime.check_divisible(30, runtime.make_mesh(), "batch_size")
    except UserError as e:
        print("ERROR:", e)
""")


def four_device_env():
    return {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4"}


def test_four_devices_train_like_one(tmp_path):
    out = tmp_path / "results.npz"
    result = subprocess.run([sys.executable, "-c", FOUR_DEVICES_SCRIPT, str(out)], cwd=REPO,
                            env=four_device_env(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "ERROR: config.batch_size=30 is not divisible by the 4 devices" in result.stdout
    results = np.load(out)
    names = sorted(k.split(":", 1)[1] for k in results.files if k.startswith("one:"))
    assert len(names) > 20
    np.testing.assert_allclose(results["four:loss_sum"], results["one:loss_sum"], rtol=1e-5)
    for name in names:  # conv biases included: their gradient is exactly zero (ops/batchnorm.py)
        np.testing.assert_allclose(results[f"four:{name}"], results[f"one:{name}"], rtol=1e-4, atol=2e-6,
                                   err_msg=name)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def one_epoch_reference(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("one_process")
    return workdir, train.train_and_evaluate(smoke_config(num_epochs=1), workdir)


def assert_close_to_reference(workdir, reference_dir):
    """A run's params and batch statistics after the smoke config's 17 steps are those of the
    one-process reference run, as far as 17 steps of Adam let two runs agree.

    Two runs that differ only in the order of their sums do not stay equal: a rounding difference
    at a tie of a ReLU or of the max-pool sends a pixel's gradient elsewhere, and Adam's first
    steps are nearly lr * sign(gradient), so a kernel entry whose gradient is near zero steps +lr
    in one run and -lr in the other (4 devices against 1 on an AVX2 machine: 1% of conv1's kernel
    2e-3 apart after the first step); from there the difference spreads, by how much depends on
    the CPU's rounding (median after 17 steps: 1e-4 on an AVX-512 Xeon, 4e-4 on an AVX2 EPYC).
    What holds on any machine: no parameter is further apart than two runs of 17 steps of about
    lr each could take it, the typical parameter far less (median under a quarter of that), and
    the batch statistics, running averages of the layers' inputs, within 1% of their size in the
    median. Agreement step by step is test_four_devices_train_like_one's job.
    """
    steps, learning_rate = 17, smoke_config().learning_rate
    ours, reference = checkpoint_trees(workdir)[0], checkpoint_trees(reference_dir)[0]

    def flat(tree):
        return np.concatenate([np.ravel(leaf) for leaf in jax.tree.leaves(tree)])

    params, reference_params = flat(ours["params"]), flat(reference["params"])
    assert np.abs(params - reference_params).max() < 2 * steps * learning_rate
    assert np.median(np.abs(params - reference_params)) < steps * learning_rate / 4
    stats, reference_stats = flat(ours["batch_stats"]), flat(reference["batch_stats"])
    assert np.median(np.abs(stats - reference_stats) / np.abs(reference_stats)) < 0.01


@pytest.mark.slow
def test_main_on_four_devices(one_epoch_reference, tmp_path):
    reference_dir, reference = one_epoch_reference
    workdir = tmp_path / "four"
    result = subprocess.run(
        [sys.executable, "-m", "resnet_flax.main", "--config=configs/smoke.py", f"--workdir={workdir}",
         "--config.num_epochs=1"], cwd=REPO, env=four_device_env(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    summary = json.loads((workdir / "summary.json").read_text())
    assert summary["device_count"] == 4 and summary["steps"] == reference["steps"]
    # The test loss moves with the parameters (assert_close_to_reference): within about 1%.
    assert abs(summary["test_loss"] - reference["test_loss"]) < 0.01 * reference["test_loss"]
    assert_close_to_reference(workdir, reference_dir)


@pytest.mark.slow
def test_two_processes_train_like_one(one_epoch_reference, tmp_path):
    reference_dir, reference = one_epoch_reference
    workdir = tmp_path / "pair"
    port = free_port()
    processes = [
        subprocess.Popen(
            [sys.executable, "-m", "resnet_flax.main", "--config=configs/smoke.py", f"--workdir={workdir}",
             "--config.num_epochs=1", f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2",
             f"--process_id={i}"],
            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for i in range(2)
    ]
    outputs = [p.communicate(timeout=300) for p in processes]
    for process, (out, err) in zip(processes, outputs):
        assert process.returncode == 0, err
    assert "Test Accuracy" in outputs[0][0] and "Test Accuracy" not in outputs[1][0]  # process 0 reports
    summary = json.loads((workdir / "summary.json").read_text())
    assert summary["process_count"] == 2 and summary["device_count"] == 2
    assert summary["steps"] == reference["steps"]
    assert abs(summary["test_loss"] - reference["test_loss"]) < 0.01 * reference["test_loss"]
    assert_close_to_reference(workdir, reference_dir)
    # The pair's checkpoint restores in a single process and evaluates as the pair did.
    trained = pretrained.load(workdir)
    from resnet_flax.evaluate import evaluate_checkpoint

    assert abs(evaluate_checkpoint(workdir)["test_loss"] - summary["test_loss"]) < 1e-5
    assert trained.epoch == 1


@pytest.mark.slow
def test_two_processes_each_decode_only_their_share_of_an_image_folder(tmp_path):
    """Two processes of two devices each on an image folder: each decodes only the rows of every
    global batch that its devices hold (every example once per pass, by one process), and they
    train like one process."""
    data_dir = write_image_folder(tmp_path / "data", classes=("a", "b c"), per_class=(20, 6))  # 40 / 12
    args = ["--config=configs/smoke.py", "--config.dataset=imagefolder", f"--config.data_dir={data_dir}",
            "--config.num_classes=0", "--config.image_size=32", "--config.preprocessing=imagenet",
            "--config.batch_size=16", "--config.eval_batch_size=8", "--config.num_epochs=2",
            "--config.bn_recalibration_batches=0"]
    alone = subprocess.run([sys.executable, "-m", "resnet_flax.main", *args, f"--workdir={tmp_path / 'one'}"],
                           cwd=REPO, capture_output=True, text=True, timeout=300)
    assert alone.returncode == 0, alone.stderr
    port = free_port()
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
    processes = [subprocess.Popen(
        [sys.executable, "-m", "resnet_flax.main", *args, f"--workdir={tmp_path / 'pair'}",
         f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2", f"--process_id={i}"],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
    outputs = [p.communicate(timeout=300) for p in processes]
    for process, (_, err) in zip(processes, outputs):
        assert process.returncode == 0, err
    decoded = []
    for i, (out, _) in enumerate(outputs):
        line = next(line for line in out.splitlines() if line.startswith(f"process {i}: decoded"))
        decoded.append((int(line.split()[3]), int(line.split()[6])))
    # Process i holds columns [8i, 8i + 8) of each training batch of 16 and [4i, 4i + 4) of each
    # test batch of 8: count the real rows there, per epoch (and per test pass: 2 epochs + the end).
    train_mask = input_pipeline.batch_indices(np.arange(40), 16)[1]
    test_mask = input_pipeline.batch_indices(np.arange(12), 8)[1]
    for i, (train_rows, test_rows) in enumerate(decoded):
        assert train_rows == 2 * train_mask[:, 8 * i:8 * i + 8].sum()
        assert test_rows == 3 * test_mask[:, 4 * i:4 * i + 4].sum()
    assert sum(d[0] for d in decoded) == 2 * 40 and sum(d[1] for d in decoded) == 3 * 12
    one = json.loads((tmp_path / "one" / "summary.json").read_text())
    pair = json.loads((tmp_path / "pair" / "summary.json").read_text())
    assert pair["process_count"] == 2 and pair["device_count"] == 4 and pair["steps"] == one["steps"]
    assert pair["class_names"] == one["class_names"] == ["a", "b c"]
    assert abs(pair["test_loss"] - one["test_loss"]) < 0.01 * one["test_loss"]
