"""Every command through the everyday mistakes: each ends with one line that names what was
wrong, exit status 1, no traceback, and the workdir's checkpoints byte for byte as they were."""

import hashlib
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from conftest import REPO, checkpoint_trees, smoke_config
from resnet_flax import checkpoints, cli, train, workdir
from resnet_flax.errors import UserError

pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")


def snapshot(path):
    """Every file under ``path`` with the SHA-256 of its bytes."""
    return {str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(path.rglob("*")) if p.is_file()}


@pytest.fixture
def run_copy(smoke_run, tmp_path):
    """A copy of the session's smoke run (2 epochs, checkpoints 1 and 2) to make mistakes on."""
    copy = tmp_path / "run"
    shutil.copytree(smoke_run[0], copy)
    return copy


def command(module, *args):
    return [sys.executable, "-m", f"resnet_flax.{module}", *map(str, args)]


def run_all(commands):
    """The commands side by side (they are independent); their CompletedProcess-like results."""
    processes = [subprocess.Popen(c, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                 for c in commands]
    return [(p, *p.communicate(timeout=300)) for p in processes]


def assert_one_line_error(result, *names):
    process, out, err = result
    lines = [line for line in err.strip().splitlines() if not line.startswith(("WARNING:", "I0000", "W0000"))]
    assert process.returncode == 1, (process.args, out, err)
    assert "Traceback" not in err, err
    assert lines and lines[-1].startswith("error: ") and len(lines) <= 3, err
    for name in names:
        assert name in lines[-1], (name, lines[-1])


def test_command_line_mistakes_are_one_line_each(tmp_path, run_copy):
    no_get_config = tmp_path / "broken.py"
    no_get_config.write_text("FIELDS = 1\n")
    not_python = tmp_path / "notes.py"
    not_python.write_text("def get_config(:\n")
    no_sweep = tmp_path / "no_sweep.py"
    no_sweep.write_text("from resnet_flax.config import default_config as get_config\n")
    a_file = tmp_path / "a_file"
    a_file.write_text("")
    empty = tmp_path / "empty"
    empty.mkdir()
    before = snapshot(run_copy / "checkpoints")
    smoke = "--config=configs/smoke.py"
    cases = [
        (command("main", "--config=configs/nope.py"), ["configs/nope.py", "not found"]),
        (command("main", f"--config={no_get_config}"), ["broken.py", "get_config()"]),
        (command("main", f"--config={not_python}"), ["notes.py", "line 1"]),
        (command("main", smoke, "--config.learning_rat=1", f"--workdir={run_copy}"),
         ["learning_rat", "did you mean --config.learning_rate?"]),
        (command("main", smoke, "--config.batch_size=abc", f"--workdir={run_copy}"), ["batch_size", "abc"]),
        (command("main", smoke, "--no_such_flag"), ["no_such_flag"]),
        (command("main", smoke, f"--workdir={a_file}"), [str(a_file), "is a file"]),
        (command("main", smoke, f"--workdir={a_file / 'run'}"), [str(a_file / "run"), "cannot be created"]),
        (command("main", smoke, f"--workdir={run_copy}", "--config.batch_size=32"),
         ["another config", "batch_size 64 -> 32", "allow_config_change"]),
        (command("evaluate", f"--workdir={empty}"), [str(empty), "no checkpoints"]),
        (command("evaluate", f"--workdir={run_copy}", "--epoch=9"), ["no checkpoint of epoch 9"]),
        (command("evaluate", f"--workdir={run_copy}", "--batch_size=x"), ["batch_size"]),
        (command("predict", f"--workdir={run_copy}"), ["image files or folders"]),
        (command("predict", f"--workdir={empty}", a_file), [str(empty), "no checkpoints"]),
        (command("sweep", "--config=configs/sweeps/smoke.py", "--config.learning_rat=1"), ["learning_rat"]),
        (command("sweep", f"--config={no_sweep}"), ["no_sweep.py", "get_sweep()"]),
        (command("keras_io", f"--workdir={run_copy}"), ["usage"]),
        (command("keras_io", "export", f"--workdir={empty}", tmp_path / "out.weights.h5"), ["no checkpoints"]),
        (command("summary", smoke, "--config.modle=resnet50"), ["modle", "did you mean --config.model?"]),
        (command("export", f"--workdir={empty}", tmp_path / "model.onnx"), ["no checkpoints"]),
        (command("export", f"--workdir={run_copy}"), ["usage"]),
    ]
    results = run_all([c for c, _ in cases])
    for (_, names), result in zip(cases, results):
        assert_one_line_error(result, *names)
    assert snapshot(run_copy / "checkpoints") == before


def test_a_second_run_on_a_workdir_stops_at_once_naming_the_first(run_copy):
    before = snapshot(run_copy / "checkpoints")
    with workdir.Lock(run_copy):  # this process is the run that holds it
        (result,) = run_all([command("main", "--config=configs/smoke.py", f"--workdir={run_copy}",
                                     "--config.num_epochs=3")])
        assert_one_line_error(result, "in use by another run", f"pid {os.getpid()}")
        with pytest.raises(UserError, match="in use by another run"):
            train.train_and_evaluate(smoke_config(num_epochs=3), run_copy)
    assert snapshot(run_copy / "checkpoints") == before


def test_a_resumed_run_records_what_changed(run_copy):
    summary = train.train_and_evaluate(smoke_config(num_epochs=3), run_copy)  # more epochs: allowed
    assert summary["epochs"] == 3
    history = [json.loads(line) for line in (run_copy / "history.jsonl").read_text().splitlines()]
    assert history[-1]["resumed_after_epoch"] == 2
    assert history[-1]["changed"] == {"num_epochs": {"was": 2, "now": 3}}
    assert json.loads((run_copy / "config.json").read_text())["num_epochs"] == 3

    with pytest.raises(UserError, match=r"another config \(label_smoothing 0.0 -> 0.1\)"):
        train.train_and_evaluate(smoke_config(num_epochs=3, label_smoothing=0.1), run_copy)
    forced = smoke_config(num_epochs=3, label_smoothing=0.1, allow_config_change=True)
    train.train_and_evaluate(forced, run_copy)  # nothing left to train, but the change is recorded
    last = json.loads((run_copy / "history.jsonl").read_text().splitlines()[-1])
    assert last["changed"]["label_smoothing"] == {"was": 0.0, "now": 0.1}
    assert json.loads((run_copy / "config.json").read_text())["label_smoothing"] == 0.1


def test_read_only_commands_skip_a_damaged_checkpoint_and_move_nothing(run_copy):
    newest = run_copy / "checkpoints" / "2"
    for item in (newest / "variables").rglob("*"):
        if item.is_file() and item.stat().st_size > 0:
            item.write_bytes(item.read_bytes()[:10])  # truncated
    before = snapshot(run_copy)
    folder = run_copy.parent / "images"
    (folder / "sub").mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name in ("b.png", "a.jpg", "sub/c.png"):
        Image.fromarray(rng.integers(0, 256, (30, 40, 3), dtype=np.uint8)).save(folder / name)
    evaluated, predicted, recursive = run_all([
        command("evaluate", f"--workdir={run_copy}", "--json"),
        command("predict", f"--workdir={run_copy}", "--json", folder),
        command("predict", f"--workdir={run_copy}", "--json", "--recursive", folder)])
    for process, out, err in (evaluated, predicted, recursive):
        assert process.returncode == 0, err
        assert f"checkpoint {newest.resolve()} is damaged" in err and "trying the one before" in err
    assert json.loads(evaluated[1].strip().splitlines()[-1])["epoch"] == 1
    assert [json.loads(line)["file"] for line in predicted[1].splitlines()] == [
        str(folder / "a.jpg"), str(folder / "b.png")]
    assert [json.loads(line)["file"] for line in recursive[1].splitlines()] == [
        str(folder / "a.jpg"), str(folder / "b.png"), str(folder / "sub" / "c.png")]
    # Read-only: the damaged checkpoint stays where it is; evaluate adds its plot, nothing else.
    after = snapshot(run_copy)
    assert after.pop("confusion_matrix.png")
    before.pop("confusion_matrix.png", None)  # an earlier evaluate of this copy wrote one too
    assert after == before
    with pytest.raises(UserError, match=r"checkpoints/2 is damaged"):
        checkpoints.restore_variables(run_copy, checkpoint_trees(run_copy, epoch=1)[0], epoch=2)


def test_non_finite_batchnorm_statistics_stop_the_run_before_a_checkpoint(tmp_path):
    """Weights whose BatchNorm running variance is NaN still train with a finite loss (training
    normalises with batch statistics), but every evaluation would be NaN: the run stops at the
    first chunk, and writes no checkpoint."""
    from resnet_flax import models, steps

    source = tmp_path / "broken"
    state_config = smoke_config()
    model = models.model_from_config(state_config)
    state = steps.create_train_state(state_config, model, steps_per_epoch=17)
    stats = dict(state.batch_stats)
    stats["bn_conv1"] = {**stats["bn_conv1"], "var": stats["bn_conv1"]["var"] * np.nan}
    checkpointer = checkpoints.Checkpointer(source)
    checkpoints.save_state(checkpointer, 1, state.replace(batch_stats=stats), state_config)
    checkpointer.close()

    run = tmp_path / "run"
    with pytest.raises(train.TrainingDiverged, match=r"BatchNorm's running statistics became non-finite \(NaN or infinite\) in epoch 1"):
        train.train_and_evaluate(smoke_config(num_epochs=1, restore_from=str(source)), run)
    assert not workdir.has_checkpoints(run)


def test_an_unexpected_error_is_one_line_unless_verbose(capsys):
    def buggy(argv):
        raise RuntimeError("something the code did not expect")

    if "verbose" not in cli.FLAGS:
        cli.flags.DEFINE_bool("verbose", False, "")
    cli.FLAGS(["test"])
    try:
        for verbose, expected in ((False, "a bug; rerun with --verbose"), (True, "Traceback")):
            cli.FLAGS.verbose = verbose
            with pytest.raises(SystemExit) as exit_info:
                cli._guarded(buggy, [])
            assert exit_info.value.code == 2
            err = capsys.readouterr().err
            assert expected in err and "something the code did not expect" in err
            assert (len(err.strip().splitlines()) == 1) == (not verbose)
    finally:
        cli.FLAGS.verbose = False
