"""configs/imagefolder.py on SIGNS written out as an image folder: what a user bringing their own
photos gets, on data whose answer is known.

    python experiments/signs_as_imagefolder.py [--data /tmp/signs_imagefolder] [--workdir runs/signs_imagefolder]

Writes SIGNS's h5 arrays as lossless PNGs in torchvision's ImageFolder layout
(``<data>/train/<label>/<h5 index>.png``, ``<data>/test/...``), then runs, each as the command a
user types and timed from start to end, ``python -m resnet_flax.main --config=configs/imagefolder.py``
(the streaming feed: every image decoded from its file when a batch needs it; compilation cache
off, so the time includes a cold compile) and ``python -m resnet_flax.evaluate`` on its last
checkpoint (per-class accuracy, confusion matrix). The folder holds the same examples as the h5
files, but indexed class by class, so the run sees them in another order than configs/signs_best.py
(same recipe; experiments/signs_best/) and is not the same run. A workdir that already finished is
read back, not rerun. Writes experiments/signs_as_imagefolder/results.md and confusion_matrix.png.
"""

import argparse
import datetime
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import h5py
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "experiments" / "signs_as_imagefolder"
SIGNS = REPO.parent / "shared" / "data" / "signs"
sys.path.insert(0, str(REPO / "experiments"))

from signs_best_seeds import machine  # noqa: E402


def write_folder(root: Path) -> None:
    if (root / ".complete").exists():
        return
    for split in ("train", "test"):
        with h5py.File(SIGNS / f"{split}_signs.h5") as f:
            images, labels = f[f"{split}_set_x"][()], f[f"{split}_set_y"][()]
        for index, (image, label) in enumerate(zip(images, labels)):
            folder = root / split / str(label)
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(image).save(folder / f"{index:04d}.png")
    (root / ".complete").touch()


def timed(command: list[str]) -> tuple[subprocess.CompletedProcess, float]:
    start = time.perf_counter()
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True)
    if result.returncode:
        sys.exit(f"{' '.join(command)} failed:\n{result.stderr}")
    return result, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="/tmp/signs_imagefolder")
    parser.add_argument("--workdir", default="runs/signs_imagefolder")
    args = parser.parse_args()
    data, workdir = Path(args.data), Path(args.workdir)
    write_folder(data)
    train_command = [sys.executable, "-m", "resnet_flax.main", "--config=configs/imagefolder.py",
                     f"--config.data_dir={data}", f"--workdir={workdir}", "--config.compilation_cache_dir=off"]
    seconds = None
    if not (workdir / "summary.json").exists():
        _, seconds = timed(train_command)
    summary = json.loads((workdir / "summary.json").read_text())
    evaluated, _ = timed([sys.executable, "-m", "resnet_flax.evaluate", f"--workdir={workdir}", "--json"])
    report = json.loads(evaluated.stdout.strip().splitlines()[-1])
    OUT.mkdir(parents=True, exist_ok=True)
    shutil.copy(report["confusion_matrix_png"], OUT / "confusion_matrix.png")

    sys.path.insert(0, str(REPO))
    from resnet_flax.evaluate import format_report

    epochs = summary["epoch_seconds"]
    lines = [
        "# configs/imagefolder.py on SIGNS as an image folder",
        "",
        f"Machine: {machine()}. Date: {datetime.date.today()}.",
        "",
        f"Command: `{' '.join(['python', *train_command[1:]])}`",
        "",
        "| | |",
        "|---|---|",
        f"| start to end | {f'{seconds / 60:.1f} min' if seconds else 'read back (already run)'} |",
        f"| epochs, steps | {summary['epochs']}, {summary['steps']} |",
        f"| steady epoch | {sorted(epochs)[len(epochs) // 2]:.1f} s (median), {summary['images_per_second']:.0f} img/s |",
        f"| compile | {summary['compile_seconds']:.1f} s |",
        f"| train accuracy (last epoch) | {summary['train_accuracy']:.4f} |",
        f"| Test Accuracy | {summary['test_accuracy']:.4f} |",
        f"| with BatchNorm re-estimated | {summary.get('recalibrated_test_accuracy', float('nan')):.4f} |",
        "",
        f"`python -m resnet_flax.evaluate --workdir={workdir}` (checkpoint epoch {report['epoch']}):",
        "",
        "```",
        format_report(report),
        "```",
        "",
        "![confusion matrix](confusion_matrix.png)",
        "",
    ]
    (OUT / "results.md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
