"""A training run's workdir: created and checked before anything is computed, held by one run at
a time, and its config checked when a run resumes in it.

* ``prepare``: a workdir that is a file, or that cannot be created or written, is a one-line error.
* ``Lock``: ``<workdir>/.lock``, held with ``flock`` while the run lives. The kernel releases it
  when the process ends, however it ends (SIGKILL included), so a killed run leaves no stale lock.
  A second run on the same workdir stops at once, naming the run that holds it; it touches nothing.
* ``check_resumed_config``: a run that resumes must be the same run. The fields in
  ``RESUMABLE_CHANGES`` may change between its invocations; any other difference stops it, unless
  ``config.allow_config_change`` says to go on with the new values. Every start is recorded in
  ``<workdir>/history.jsonl`` with what changed, and ``config.json`` always holds the config the
  run goes on with.
"""

import datetime
import fcntl
import json
import os
import socket
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from resnet_flax import metrics
from resnet_flax.errors import UserError

LOCK_FILE = ".lock"
CONFIG_FILE = "config.json"
HISTORY_FILE = "history.jsonl"

# How long a run goes on, where its data and caches are, what it keeps and reports, and how it
# starts (read only when there is no checkpoint yet): none of these makes it another run.
RESUMABLE_CHANGES = ("num_epochs", "data_dir", "data_format", "compilation_cache_dir", "checkpoint_every_epochs",
                     "keep_checkpoints", "bn_recalibration_batches", "restore_from", "restore_optimizer",
                     "allow_config_change", "profile_steps", "data_threads", "bad_images",
                     "checkpoint_every_steps")


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


def prepare(path: str | Path) -> Path:
    """``path`` as a folder that exists and can be written to."""
    path = Path(path).expanduser()
    if path.exists() and not path.is_dir():
        raise UserError(f"workdir {path} is a file, not a folder; give another --workdir")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"workdir {path} cannot be created ({e.strerror or e}); give another --workdir") from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise UserError(f"workdir {path} is not writable; give another --workdir")
    return path


class Lock:
    """``with Lock(workdir):`` holds the workdir for this process (a no-op when not ``enabled``,
    as in the processes of a multi-host run other than the first, which share process 0's)."""

    def __init__(self, workdir: str | Path, enabled: bool = True):
        self.path = Path(workdir) / LOCK_FILE
        self.enabled = enabled
        self._file = None

    def __enter__(self) -> "Lock":
        if not self.enabled:
            return self
        file = open(self.path, "a+")
        try:
            fcntl.flock(file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            file.seek(0)
            holder = file.read().strip() or "a process that did not say which"
            file.close()
            raise UserError(f"workdir {self.path.parent} is in use by another run ({holder}); let it finish, "
                            f"or stop it, or give another --workdir") from None
        file.seek(0)
        file.truncate()
        file.write(f"pid {os.getpid()} on {socket.gethostname()}, since {_now()}\n")
        file.flush()
        self._file = file
        return self

    def __exit__(self, *exc_info) -> None:
        if self._file is not None:
            self._file.close()  # closing releases the lock
            self._file = None


def has_checkpoints(workdir: str | Path) -> bool:
    root = Path(workdir) / "checkpoints"
    return root.is_dir() and any(p.name.isdigit() for p in root.iterdir())


def config_differences(saved: Mapping[str, Any], config: Mapping[str, Any], defaults: Mapping[str, Any]
                       ) -> dict[str, tuple[Any, Any]]:
    """``{field: (saved, now)}`` for every field whose value differs; a field the saved config lacks
    (written before the field existed) counts with its default."""
    fields = sorted(set(saved) | set(config))
    old = {k: saved.get(k, defaults.get(k)) for k in fields}
    new = {k: config.get(k, defaults.get(k)) for k in fields}
    return {k: (old[k], new[k]) for k in fields if old[k] != new[k]}


def check_resumed_config(workdir: str | Path, config: Mapping[str, Any], defaults: Mapping[str, Any]
                         ) -> dict[str, tuple[Any, Any]]:
    """For a workdir that holds checkpoints: the fields that change against its ``config.json``;
    stops if any of them is not in ``RESUMABLE_CHANGES``, unless ``allow_config_change`` is set."""
    path = Path(workdir) / CONFIG_FILE
    if not has_checkpoints(workdir) or not path.is_file():
        return {}
    try:
        saved = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"{path}: unreadable ({e}); it describes the run being resumed") from None
    as_saved = json.loads(json.dumps(dict(config), default=repr))  # tuples as lists, as config.json has them
    changes = config_differences(saved, as_saved, defaults)
    refused = {k: v for k, v in changes.items() if k not in RESUMABLE_CHANGES}
    if refused and not config.get("allow_config_change"):
        listed = ", ".join(f"{k} {old!r} -> {new!r}" for k, (old, new) in refused.items())
        raise UserError(f"workdir {workdir} holds a run with another config ({listed}); give another --workdir "
                        f"to start a new run, or add --config.allow_config_change=True to go on with the new values")
    return changes


def record_start(workdir: str | Path, config: Mapping[str, Any], resumed_epoch: int,
                 changes: Mapping[str, tuple[Any, Any]]) -> None:
    """Writes ``config.json`` and appends this start to ``history.jsonl``."""
    workdir = Path(workdir)
    entry = {"time": _now(), "host": socket.gethostname(), "pid": os.getpid(), "resumed_after_epoch": resumed_epoch,
             "changed": {k: {"was": old, "now": new} for k, (old, new) in changes.items()}}
    with (workdir / HISTORY_FILE).open("a") as f:
        f.write(json.dumps(entry, default=repr) + "\n")
    metrics.write_json(workdir / CONFIG_FILE, dict(config))
