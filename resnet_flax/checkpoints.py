"""Orbax checkpoints of a run: saved after epochs (and, with ``config.checkpoint_every_steps`` or
on SIGTERM, within them), resumed from the newest good one, checked against the model before
anything is loaded.

Layout: ``<workdir>/checkpoints/<epoch>/`` (after an epoch) and ``<workdir>/step_checkpoints/<step>/``
(within one) hold the same items -- ``variables`` (params and batch_stats), ``optimizer``
(optimizer state and step), ``config`` (the run's config as JSON, so a checkpoint is usable
without the config file), ``progress`` (the epochs completed, the step, and the data's position:
the batches of the next epoch already trained on, with that epoch's sums so far) and ``dataset``
(the class names, where the data came from) -- and, with ``config.ema_decay``, ``ema``, the moving
average of ``variables``, in their layout. Weights-only restores read ``variables`` (or ``ema``)
alone. ``evaluate``, ``predict`` and the exports read the epoch checkpoints.

Saves are synchronous and atomic (orbax writes a temporary directory and renames it when
complete), so a killed run leaves only complete checkpoints. A checkpoint that fails to restore
is reported, moved to ``<workdir>/damaged_checkpoints/`` (never deleted) and the one before it is
used.
"""

import shutil
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TypeVar

import jax
import ml_collections
import orbax.checkpoint as ocp

from resnet_flax.config import default_config
from resnet_flax.errors import UserError

T = TypeVar("T")
CHECKPOINT_DIR = "checkpoints"
STEP_CHECKPOINT_DIR = "step_checkpoints"
DAMAGED_DIR = "damaged_checkpoints"


def checkpoint_root(path: str | Path) -> Path:
    """Accepts a workdir or its ``checkpoints`` folder."""
    path = Path(path).expanduser().resolve()
    return path if path.name == CHECKPOINT_DIR else path / CHECKPOINT_DIR


def _manager(root: Path, keep: int | None = None, read_only: bool = False) -> ocp.CheckpointManager:
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep, create=not read_only, read_only=read_only,
        enable_async_checkpointing=False, cleanup_tmp_directories=not read_only)
    # Handlers named up front, so a fresh manager can read metadata before any save.
    handlers = {"variables": ocp.StandardCheckpointHandler(), "optimizer": ocp.StandardCheckpointHandler(),
                "ema": ocp.StandardCheckpointHandler(),
                "config": ocp.JsonCheckpointHandler(), "progress": ocp.JsonCheckpointHandler(),
                "dataset": ocp.JsonCheckpointHandler()}
    return ocp.CheckpointManager(root, options=options, item_handlers=handlers)


def _flat_shapes(tree) -> dict[str, tuple[int, ...]]:
    leaves = jax.tree_util.tree_leaves_with_path(tree)
    return {"/".join(str(getattr(k, "key", getattr(k, "name", k))) for k in path): tuple(leaf.shape)
            for path, leaf in leaves}


def describe(error: Exception) -> str:
    """An orbax error in a few words: its type and the start of its first line."""
    lines = str(error).splitlines()
    return f"{type(error).__name__}: {lines[0][:200] if lines else ''}"


def check_matches(saved, expected, where: str, what: str) -> None:
    """Stops, naming the first differing path, unless ``saved`` has exactly ``expected``'s structure
    and shapes."""
    saved_shapes, expected_shapes = _flat_shapes(saved), _flat_shapes(expected)
    for path, shape in expected_shapes.items():
        if path not in saved_shapes:
            raise UserError(f"{where}: {what} {path} is missing from the checkpoint "
                            f"(it holds {sorted(saved_shapes)[:4]}...)")
        if saved_shapes[path] != shape:
            raise UserError(f"{where}: {what} {path} has shape {saved_shapes[path]} in the checkpoint "
                            f"but {shape} in the model being built")
    extra = sorted(set(saved_shapes) - set(expected_shapes))
    if extra:
        raise UserError(f"{where}: the checkpoint has {what} {extra[0]} that the model being built lacks")


class Checkpointer:
    """Saves and restores a run's checkpoints in ``<workdir>/checkpoints`` (``folder``: or another
    folder of the workdir, ``STEP_CHECKPOINT_DIR``), keyed by epoch (or step)."""

    def __init__(self, workdir: str | Path, keep: int = 3, folder: str = CHECKPOINT_DIR):
        self.workdir = Path(workdir)
        self.root = (checkpoint_root(workdir) if folder == CHECKPOINT_DIR
                     else self.workdir.expanduser().resolve() / folder)
        self._manager = _manager(self.root, keep=keep)

    def save(self, key: int, variables: Mapping, optimizer: Mapping, config: ml_collections.ConfigDict,
             ema: Mapping | None = None, progress: Mapping | None = None, dataset: Mapping | None = None) -> None:
        """Saves under ``key``; ``progress`` gets the step added (``{"epoch": key}`` if not given)."""
        step = int(jax.device_get(optimizer["step"]))
        items = dict(
            variables=ocp.args.StandardSave(variables),
            optimizer=ocp.args.StandardSave(optimizer),
            config=ocp.args.JsonSave(config.to_dict()),
            progress=ocp.args.JsonSave({"epoch": key, **(progress or {}), "step": step}),
        )
        if ema is not None:
            items["ema"] = ocp.args.StandardSave(ema)
        if dataset is not None:
            items["dataset"] = ocp.args.JsonSave(dict(dataset))
        self._manager.save(key, args=ocp.args.Composite(**items))
        self._manager.wait_until_finished()

    def newest_step(self) -> int | None:
        """The training step of the newest checkpoint, by its progress record (None: none, or its
        record is unreadable, which ``restore_latest`` then deals with)."""
        keys = self._manager.all_steps()
        if not keys:
            return None
        try:
            return int(self._progress(max(keys))["step"])
        except Exception:  # damaged: let restore_latest report it and fall back
            return None

    def _progress(self, key: int) -> dict:
        return dict(self._manager.restore(key, args=ocp.args.Composite(progress=ocp.args.JsonRestore()))["progress"])

    def restore_latest(self, variables: Mapping, optimizer: Mapping, ema: Mapping | None = None
                       ) -> tuple[dict, dict, dict | None, dict] | None:
        """The newest checkpoint that restores, as (variables, optimizer, ema, progress); None if
        none. ``progress`` is the saved record (``Checkpointer.save``), with ``key``.

        ``variables``, ``optimizer`` and ``ema`` (None: not wanted) are abstract targets (shapes,
        dtypes, shardings); ``ema`` comes back None from a checkpoint written without one. A
        checkpoint that does not fit them is the user's mistake and stops the run; one that is
        damaged is moved aside and the previous one is tried.
        """
        for key in sorted(self._manager.all_steps(), reverse=True):
            where = str(self.root / str(key))
            try:
                metadata = self._manager.item_metadata(key)
                if any(metadata.get(item) is None for item in ("variables", "optimizer")):
                    raise FileNotFoundError("its metadata is missing")
                check_matches(metadata["variables"], variables, where, "variable")
                check_matches(metadata["optimizer"], optimizer, where, "optimizer entry")
                items = dict(variables=ocp.args.StandardRestore(variables),
                             optimizer=ocp.args.StandardRestore(optimizer))
                if ema is not None and metadata.get("ema") is not None:
                    check_matches(metadata["ema"], ema, where, "moving-average variable")
                    items["ema"] = ocp.args.StandardRestore(ema)
                items["progress"] = ocp.args.JsonRestore()
                restored = self._manager.restore(key, args=ocp.args.Composite(**items))
            except UserError:
                raise
            except Exception as e:  # damaged: orbax raises many types for missing/truncated files
                self._set_aside(key, e)
                continue
            restored_ema = dict(restored["ema"]) if "ema" in items else None
            progress = {"epoch": key, "batch": 0, **dict(restored["progress"] or {}), "key": key}
            return dict(restored["variables"]), dict(restored["optimizer"]), restored_ema, progress
        return None

    def _set_aside(self, epoch: int, error: Exception) -> None:
        target = self.workdir / DAMAGED_DIR / f"{epoch}-{time.strftime('%Y%m%d-%H%M%S')}"
        if jax.process_index() == 0:
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.move(str(self.root / str(epoch)), str(target))
        print(f"warning: checkpoint {self.root / str(epoch)} is damaged ({describe(error)}); moved it to {target} "
              "and trying the one before", file=sys.stderr, flush=True)
        self._manager.reload()

    def close(self) -> None:
        self._manager.close()


def saved_epochs(path: str | Path) -> list[int]:
    """The epochs of ``path``'s complete checkpoints, newest first."""
    root = checkpoint_root(path)
    if not root.is_dir():
        raise UserError(f"{path}: no checkpoints (expected a workdir holding {CHECKPOINT_DIR}/)")
    manager = _manager(root, read_only=True)
    epochs = sorted(manager.all_steps(), reverse=True)
    manager.close()
    if not epochs:
        raise UserError(f"{root}: holds no complete checkpoint")
    return epochs


def newest_restorable(path: str | Path, restore: Callable[[int], T], epoch: int | None = None) -> T:
    """``restore(epoch)`` for the newest of ``path``'s checkpoints that restores, or for ``epoch``.

    The rule ``Checkpointer.restore_latest`` follows, for commands that only read: a damaged
    checkpoint is reported and the one before it tried, and nothing is moved or deleted. A
    ``UserError`` from ``restore`` (a checkpoint that does not fit the model) stops at once.
    """
    root = checkpoint_root(path)
    epochs = saved_epochs(path)
    if epoch is not None:
        if epoch not in epochs:
            raise UserError(f"{root}: no checkpoint of epoch {epoch} (there are {sorted(epochs)})")
        epochs = [epoch]
    for candidate in epochs:
        try:
            return restore(candidate)
        except UserError:
            raise
        except Exception as e:  # damaged: orbax raises many types for missing/truncated files
            if epoch is not None:
                raise UserError(f"checkpoint {root / str(candidate)} is damaged ({describe(e)})") from None
            print(f"warning: checkpoint {root / str(candidate)} is damaged ({describe(e)}); trying the one before",
                  file=sys.stderr, flush=True)
    raise UserError(f"{root}: every checkpoint is damaged (epochs {sorted(epochs)})")


def load_config(path: str | Path, epoch: int) -> ml_collections.ConfigDict:
    """The config saved with the checkpoint of ``epoch``; a field added since it was saved gets
    its default (which does what the code of that time did)."""
    manager = _manager(checkpoint_root(path), read_only=True)
    try:
        saved = manager.restore(epoch, args=ocp.args.Composite(config=ocp.args.JsonRestore()))
    finally:
        manager.close()
    config = default_config()
    config.update(saved["config"])
    return config


def variables_metadata(path: str | Path, epoch: int) -> dict:
    """The shapes and dtypes of the checkpoint of ``epoch``'s variables (orbax metadata, nothing read)."""
    manager = _manager(checkpoint_root(path), read_only=True)
    try:
        return dict(manager.item_metadata(epoch)["variables"])
    finally:
        manager.close()


def read_variables(path: str | Path, epoch: int, variables: Mapping, optimizer: Mapping | None = None,
                   item: str = "variables") -> tuple[dict, dict | None]:
    """Weights (and, given an abstract ``optimizer``, the optimizer state) of the checkpoint of
    ``epoch``, checked against the abstract targets first; ``item='ema'`` reads the moving
    average of the weights instead."""
    root = checkpoint_root(path)
    manager = _manager(root, read_only=True)
    try:
        where = str(root / str(epoch))
        metadata = manager.item_metadata(epoch)
        if metadata.get(item) is None and item == "ema":
            raise UserError(f"{where}: holds no moving average of the weights (config.ema_decay was 0)")
        check_matches(metadata[item], variables, where, "variable")
        items = {item: ocp.args.StandardRestore(variables)}
        if optimizer is not None:
            check_matches(metadata["optimizer"], optimizer, where, "optimizer entry")
            items["optimizer"] = ocp.args.StandardRestore(optimizer)
        restored = manager.restore(epoch, args=ocp.args.Composite(**items))
    finally:
        manager.close()
    return dict(restored[item]), (dict(restored["optimizer"]) if optimizer is not None else None)


def restore_variables(path: str | Path, variables: Mapping, epoch: int | None = None,
                      optimizer: Mapping | None = None) -> tuple[dict, dict | None, int]:
    """``read_variables`` from another run's checkpoint of ``epoch``, or its newest that restores;
    returns the weights, the optimizer state (or None) and the epoch."""
    return newest_restorable(path, lambda e: (*read_variables(path, e, variables, optimizer), e), epoch)


# ---------------------------------------------------------------------------------------------
# A run's train state (``steps.TrainState``) as checkpoint items, so weights can be read alone.


def split_state(state) -> tuple[dict, dict]:
    """``(variables, optimizer)``: params and batch_stats; optimizer state and step."""
    variables = {"params": state.params, "batch_stats": state.batch_stats}
    return variables, {"opt_state": state.opt_state, "step": state.step}


def save_state(checkpointer: Checkpointer, key: int, state, config: ml_collections.ConfigDict,
               progress: Mapping | None = None, dataset: Mapping | None = None) -> None:
    checkpointer.save(key, *split_state(state), config, ema=getattr(state, "ema", None), progress=progress,
                      dataset=dataset)


def class_names(path: str | Path, epoch: int, num_classes: int) -> list[str]:
    """The class names saved with a checkpoint; '0', '1', ... for one saved without them."""
    root = checkpoint_root(path)
    if not (root / str(epoch) / "dataset").is_dir():
        return [str(i) for i in range(num_classes)]
    manager = _manager(root, read_only=True)
    try:
        saved = manager.restore(epoch, args=ocp.args.Composite(dataset=ocp.args.JsonRestore()))["dataset"]
    finally:
        manager.close()
    names = list(saved.get("class_names") or [])
    return names if len(names) == num_classes else [str(i) for i in range(num_classes)]
