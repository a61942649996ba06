"""Sweeps: building blocks, a resumable runner, result tables."""

import pytest

from conftest import REPO
from resnet_flax.errors import UserError


def test_sweep_runs_each_setting_once_and_tabulates(tmp_path):
    from resnet_flax import sweep
    from resnet_flax.config import load_config_module

    module = load_config_module(REPO / "configs" / "sweeps" / "smoke.py")
    settings = module.get_sweep()
    assert settings == [{"learning_rate": 1e-3, "batch_size": 64}, {"learning_rate": 3e-3, "batch_size": 64}]
    logged = []
    rows = sweep.run_sweep(module.get_config(), settings, tmp_path, log=logged.append)
    sweep.write_results(rows, tmp_path, "smoke")
    assert [r["learning_rate"] for r in rows] == [1e-3, 3e-3]
    assert all(r["epochs"] == 1 and 0 <= r["test_accuracy"] <= 1 for r in rows)
    assert rows[0]["test_accuracy"] != rows[1]["test_accuracy"] or rows[0]["test_loss"] != rows[1]["test_loss"]
    table = (tmp_path / "results.md").read_text()
    assert "learning_rate" in table and table.count("\n| 00") == 2
    assert (tmp_path / "results.png").read_bytes()[:4] == b"\x89PNG"
    # A second invocation (a restarted sweep) skips what finished and reports the same rows.
    again = sweep.run_sweep(module.get_config(), settings, tmp_path, log=logged.append)
    assert again == rows and sum("skipped" in line for line in logged) == 2
    with pytest.raises(UserError, match="'learning_rat' is not a config field"):
        sweep.run_sweep(module.get_config(), [{"learning_rat": 1.0}], tmp_path / "bad")


def test_sweep_building_blocks():
    from resnet_flax.sweep import product, sweep, zip_sweeps

    assert product(sweep("a", [1, 2]), sweep("b", [3])) == [{"a": 1, "b": 3}, {"a": 2, "b": 3}]
    assert zip_sweeps(sweep("a", [1, 2]), sweep("b", [3, 4])) == [{"a": 1, "b": 3}, {"a": 2, "b": 4}]
    with pytest.raises(UserError):
        zip_sweeps(sweep("a", [1, 2]), sweep("b", [3]))
