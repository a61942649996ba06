"""Families of runs: ``python -m resnet_flax.sweep --config=configs/sweeps/NAME.py --workdir=runs/NAME``.

A sweep config file has ``get_config()`` (the base run config) and ``get_sweep()`` (a list of
override dicts, built with :func:`sweep`, :func:`product` and :func:`zip_sweeps`). The base config
takes command-line overrides as ``main`` does (``--config.num_epochs=5``); a setting's own values
win over them. Each setting
runs in its own sub-workdir; a setting whose ``summary.json`` exists is skipped and a killed one
resumes from its checkpoints, so a killed sweep restarted with the same command picks up where it
stopped. At the end ``results.csv``, ``results.md`` and ``results.png`` tabulate every run.
"""

import csv
import itertools
import json
import re
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import ml_collections
from absl import flags
from ml_collections import config_flags

from resnet_flax import cli, metrics, train
from resnet_flax import workdir as workdir_lib
from resnet_flax.config import load_config_module
from resnet_flax.errors import UserError

RESULT_FIELDS = ("test_accuracy", "recalibrated_test_accuracy", "test_accuracy_unseen",
                 "train_accuracy", "test_loss", "epochs", "train_seconds")


def sweep(name: str, values: Iterable[Any]) -> list[dict[str, Any]]:
    """One field over several values: ``sweep('learning_rate', [1e-3, 3e-3])``."""
    return [{name: value} for value in values]


def product(*sweeps: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Every combination of the given sweeps."""
    return [dict(itertools.chain.from_iterable(d.items() for d in combo))
            for combo in itertools.product(*sweeps)]


def zip_sweeps(*sweeps: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Settings taken side by side (all sweeps must have the same length)."""
    if len({len(s) for s in sweeps}) > 1:
        raise UserError("zip_sweeps: the sweeps have different lengths")
    return [dict(itertools.chain.from_iterable(d.items() for d in combo)) for combo in zip(*sweeps)]


def run_name(index: int, overrides: Mapping[str, Any]) -> str:
    text = ",".join(f"{k}={v}" for k, v in overrides.items()) or "base"
    return f"{index:03d}_" + re.sub(r"[^A-Za-z0-9_.,=+-]", "_", text)


def apply_overrides(base: ml_collections.ConfigDict, overrides: Mapping[str, Any]) -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict(base.to_dict())
    for name, value in overrides.items():
        if name not in config:
            raise UserError(f"sweep: {name!r} is not a config field (fields: {sorted(config)})")
        config[name] = value
    return config


def run_sweep(base: ml_collections.ConfigDict, settings: Sequence[Mapping[str, Any]], workdir: str | Path,
              log=print) -> list[dict[str, Any]]:
    """Runs every setting not yet finished; returns one result row per setting."""
    workdir = workdir_lib.prepare(workdir)
    configs = [apply_overrides(base, overrides) for overrides in settings]  # all checked up front
    rows = []
    for index, (overrides, config) in enumerate(zip(settings, configs)):
        run_dir = workdir / run_name(index, overrides)
        summary_path = run_dir / "summary.json"
        if summary_path.is_file():
            log(f"[{index + 1}/{len(settings)}] {run_dir.name}: finished before, skipped")
            summary = json.loads(summary_path.read_text())
        else:
            log(f"[{index + 1}/{len(settings)}] {run_dir.name}")
            summary = train.train_and_evaluate(config, run_dir)
        rows.append({"run": run_dir.name, **overrides,
                     "train_seconds": sum(summary.get("epoch_seconds") or [0.0]),
                     **{k: summary.get(k) for k in RESULT_FIELDS if k != "train_seconds"}})
    return rows


def write_results(rows: Sequence[Mapping[str, Any]], workdir: str | Path, title: str) -> None:
    """results.csv, results.md and results.png in ``workdir``."""
    workdir = Path(workdir)
    columns = list(dict.fromkeys(k for row in rows for k in row))
    with (workdir / "results.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)

    def cell(value):
        return f"{value:.4f}" if isinstance(value, float) else ("" if value is None else str(value))

    lines = [f"# {title}", "", "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(row.get(c)) for c in columns) + " |" for row in rows]
    (workdir / "results.md").write_text("\n".join(lines) + "\n")
    metrics.plot_sweep(rows, workdir / "results.png", title)


def define_flags() -> None:
    """Command-line flags, defined only when run as a command so that importing stays free."""
    config_flags.DEFINE_config_file("config", None, "Sweep config file (configs/sweeps/*.py).", lock_config=True)
    flags.DEFINE_string("workdir", None, "Where the runs go (default runs/<sweep name>).")
    flags.mark_flags_as_required(["config"])


def main(argv) -> None:
    del argv
    FLAGS = flags.FLAGS
    config_file = FLAGS["config"].config_filename.split(":")[0]
    workdir = Path(FLAGS.workdir or Path("runs") / Path(config_file).stem)
    start = time.perf_counter()
    settings = load_config_module(config_file, "get_config", "get_sweep").get_sweep()
    rows = run_sweep(FLAGS.config, settings, workdir)
    write_results(rows, workdir, title=f"sweep {Path(config_file).stem}")
    print(f"{len(rows)} runs in {time.perf_counter() - start:.0f}s; table: {workdir / 'results.md'}")
    print((workdir / "results.md").read_text())


if __name__ == "__main__":
    cli.run(main, define_flags)
