"""What a run reports: a progress bar, a Keras-like line per epoch, JSON lines, TensorBoard, a plot.

Only the writer for process 0 writes files; the others are quiet (``enabled=False``).
"""

import json
import math
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import tqdm

EPOCH_FIELDS = ("epoch", "train_loss", "train_accuracy", "test_loss", "test_accuracy",
                "seconds", "images_per_second")


def progress_bar(total: int, epoch: int, num_epochs: int, enabled: bool = True, initial: int = 0) -> tqdm.tqdm:
    """A bar over the epoch's training examples (``initial`` of them done before a resume); off
    when stderr is not a terminal."""
    return tqdm.tqdm(total=total, initial=initial, desc=f"Epoch {epoch}/{num_epochs}", unit="img", leave=False,
                     disable=None if enabled else True, file=sys.stderr, dynamic_ncols=True)


def keras_line(record: Mapping[str, float], num_epochs: int, steps: int) -> str:
    """``Epoch 1/2 - 34 steps - 41s - loss: 2.0155 - accuracy: 0.3694 - test_loss: ...``."""
    return (
        f"Epoch {record['epoch']}/{num_epochs} - {steps} steps - {record['seconds']:.0f}s "
        f"({record['images_per_second']:.0f} img/s) - loss: {record['train_loss']:.4f} - "
        f"accuracy: {record['train_accuracy']:.4f} - test_loss: {record['test_loss']:.4f} - "
        f"test_accuracy: {record['test_accuracy']:.4f}"
        + (f" - ema_test_accuracy: {record['ema_test_accuracy']:.4f}" if "ema_test_accuracy" in record else "")
    )


def read_jsonl(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def write_json(path: Path, obj) -> None:
    """Writes through a temporary file so a killed run never leaves half a JSON file."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")
    tmp.replace(path)


class MetricsWriter:
    """Per-epoch records to ``metrics.jsonl`` and TensorBoard event files in ``workdir``."""

    def __init__(self, workdir: Path, enabled: bool = True):
        self.workdir = Path(workdir)
        self.enabled = enabled
        self._tensorboard = None
        if enabled:
            self._tensorboard = _summary_writer_class()(str(self.workdir / "tensorboard"))

    @property
    def jsonl_path(self) -> Path:
        return self.workdir / "metrics.jsonl"

    def keep_epochs_before(self, epoch: int) -> list[dict]:
        """Drops records of epochs >= ``epoch`` (a resumed run redoes them) and returns the rest."""
        records = [r for r in read_jsonl(self.jsonl_path) if r["epoch"] < epoch]
        if self.enabled:
            tmp = self.jsonl_path.with_suffix(".jsonl.tmp")
            tmp.write_text("".join(json.dumps(r) + "\n" for r in records))
            tmp.replace(self.jsonl_path)
        return records

    def write_epoch(self, record: Mapping[str, float], step: int) -> None:
        if not self.enabled:
            return
        with self.jsonl_path.open("a") as f:
            f.write(json.dumps(dict(record)) + "\n")
        for name, value in record.items():
            if name != "epoch" and isinstance(value, (int, float)) and math.isfinite(value):
                self._tensorboard.add_scalar(name, value, step)
        self._tensorboard.flush()

    def close(self) -> None:
        if self._tensorboard is not None:
            self._tensorboard.close()


def _summary_writer_class():
    """tensorboardX's SummaryWriter, imported here (heavy, and only process 0 needs it).

    tensorboardX imports torch whenever torch is installed, only to accept torch tensors: 2-3 s
    of every run's start-up. The writer gets Python floats, so torch is hidden from that import
    unless something has loaded it already.
    """
    if "torch" in sys.modules:
        from tensorboardX import SummaryWriter
        return SummaryWriter
    sys.modules["torch"] = None  # makes `import torch` raise ImportError, which tensorboardX handles
    try:
        from tensorboardX import SummaryWriter
    finally:
        del sys.modules["torch"]
    return SummaryWriter


def plot_curves(records: Sequence[Mapping[str, float]], path: Path, title: str = "") -> None:
    """Loss and accuracy per epoch, train and test, as a PNG."""
    epochs = [r["epoch"] for r in records]
    fig = _figure(figsize=(10, 4))
    ax_loss, ax_acc = fig.subplots(1, 2)
    for split in ("train", "test"):
        ax_loss.plot(epochs, [r[f"{split}_loss"] for r in records], "o-", label=split)
        ax_acc.plot(epochs, [r[f"{split}_accuracy"] for r in records], "o-", label=split)
    ax_loss.set(xlabel="epoch", ylabel="loss", title="loss")
    ax_acc.set(xlabel="epoch", ylabel="accuracy", title="accuracy", ylim=(0, 1.02))
    for ax in (ax_loss, ax_acc):
        ax.grid(alpha=0.3)
        ax.legend()
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def plot_confusion(matrix: np.ndarray, class_names: Sequence[str], path: Path, title: str = "") -> None:
    """A confusion matrix (rows: true class, columns: predicted) as a PNG, each row as fractions of
    its class, the counts written in the cells when there are few classes."""
    n = len(class_names)
    fractions = matrix / np.maximum(matrix.sum(axis=1, keepdims=True), 1)
    size = min(4 + 0.45 * n, 30)
    fig = _figure(figsize=(size + 1.5, size))
    ax = fig.subplots()
    image = ax.imshow(fractions, cmap="Blues", vmin=0, vmax=1)
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="fraction of the true class")
    if n <= 40:
        ax.set_xticks(range(n), class_names, rotation=90 if n > 8 else 0, fontsize=8)
        ax.set_yticks(range(n), class_names, fontsize=8)
    if n <= 20:
        for i in range(n):
            for j in range(n):
                if matrix[i, j]:
                    ax.text(j, i, int(matrix[i, j]), ha="center", va="center", fontsize=8,
                            color="white" if fractions[i, j] > 0.5 else "black")
    ax.set(xlabel="predicted class", ylabel="true class", title=title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def plot_sweep(rows: Sequence[Mapping], path: Path, title: str = "") -> None:
    """Test accuracy of every run of a sweep (and with re-estimated BatchNorm, when reported)."""
    names = [r["run"].split("_", 1)[1] for r in rows]
    fig = _figure(figsize=(max(6, 0.6 * len(rows) + 2), 4.5))
    ax = fig.subplots()
    positions = range(len(rows))
    series = [("test_accuracy", "test accuracy")]
    if any(r.get("recalibrated_test_accuracy") is not None for r in rows):
        series.append(("recalibrated_test_accuracy", "re-estimated BatchNorm"))
    width = 0.8 / len(series)
    for i, (key, label) in enumerate(series):
        ax.bar([p + i * width for p in positions], [r.get(key) or 0 for r in rows], width, label=label)
    ax.set_xticks([p + width * (len(series) - 1) / 2 for p in positions], names, rotation=45, ha="right",
                  fontsize=8)
    ax.set(ylabel="accuracy", ylim=(0, 1.02), title=title)
    ax.grid(axis="y", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def _figure(**kwargs):
    """A matplotlib figure drawn off-screen without touching pyplot's backend, which a notebook
    that calls ``train_and_evaluate`` keeps for its own inline plots."""
    from matplotlib.figure import Figure  # imported here: heavy, and only process 0 plots

    return Figure(**kwargs)
