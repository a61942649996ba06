"""He et al. (2015), Figure 4, on SIGNS: does the deeper plain net train worse and the deeper
ResNet better? Runs ``configs/sweeps/figure4.py`` (runs already finished in ``--workdir`` are
kept) and writes the curves (training error thin, test error bold, as in the paper) and a table.

    python experiments/figure4.py [--workdir runs/figure4] [--out experiments/figure4]
"""

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

from matplotlib.figure import Figure

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from resnet_flax import sweep  # noqa: E402
from resnet_flax.config import load_config_module  # noqa: E402

SWEEP_CONFIG = REPO / "configs" / "sweeps" / "figure4.py"


def machine() -> str:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    return f"{cpu}, {os.cpu_count()} cores, Python {platform.python_version()}"


def epochs_of(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]


def plot(curves: dict[str, list[dict]], path: Path) -> None:
    figure = Figure(figsize=(10, 4))
    for axis, family in zip(figure.subplots(1, 2, sharey=True), ("plain", "resnet")):
        for model, color in ((f"{family}18", "tab:red"), (f"{family}34", "tab:blue")):
            epochs = [r["epoch"] for r in curves[model]]
            axis.plot(epochs, [100 * (1 - r["train_accuracy"]) for r in curves[model]], color=color,
                      linewidth=0.8, linestyle="--", label=f"{model} train")
            axis.plot(epochs, [100 * (1 - r["test_accuracy"]) for r in curves[model]], color=color,
                      linewidth=2.2, label=f"{model} test")
        axis.set_title("plain" if family == "plain" else "ResNet")
        axis.set_xlabel("epoch")
        axis.grid(alpha=0.3)
        axis.legend()
    figure.axes[0].set_ylabel("error (%)")
    figure.suptitle("SIGNS, He et al. (2015) Figure 4 setting: training error (thin) and test error (bold)")
    figure.savefig(path, dpi=110, bbox_inches="tight")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", default="runs/figure4")
    parser.add_argument("--out", default=str(REPO / "experiments" / "figure4"))
    args = parser.parse_args()
    start = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    module = load_config_module(SWEEP_CONFIG, "get_config", "get_sweep")
    settings = module.get_sweep()
    rows = sweep.run_sweep(module.get_config(), settings, args.workdir)
    curves = {row["model"]: epochs_of(Path(args.workdir) / row["run"]) for row in rows}

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    plot(curves, out / "figure4.png")
    lines = [
        "# He et al. (2015), Figure 4, on SIGNS", "",
        f"Command: `python experiments/figure4.py` (the sweep `configs/sweeps/figure4.py`), started {start}.",
        f"Machine: {machine()}.", "",
        "Errors in %, of the last epoch; training error is measured during the epoch (augmented images, "
        "training-mode BatchNorm), test error with the running BatchNorm statistics and with statistics "
        "re-estimated over the training set; best test error over the epochs beside it.", "",
        "| model | train error | test error | re-estimated test error | best test error (epoch) | s/epoch |",
        "|---|---|---|---|---|---|",
    ]
    for row in rows:
        epochs = curves[row["model"]]
        best = min(epochs, key=lambda r: 1 - r["test_accuracy"])
        lines.append(
            f"| {row['model']} | {100 * (1 - row['train_accuracy']):.1f} | {100 * (1 - row['test_accuracy']):.1f} | "
            f"{100 * (1 - row['recalibrated_test_accuracy']):.1f} | {100 * (1 - best['test_accuracy']):.1f} "
            f"({best['epoch']}) | {row['train_seconds'] / len(epochs):.1f} |")
    lines += ["", "Training error by epoch (%):", "",
              "| epoch | " + " | ".join(curves) + " |", "|---|" + "---|" * len(curves)]
    for index in range(max(len(c) for c in curves.values())):
        cells = [f"{100 * (1 - c[index]['train_accuracy']):.1f}" if index < len(c) else "" for c in curves.values()]
        lines.append(f"| {index + 1} | " + " | ".join(cells) + " |")
    (out / "results.md").write_text("\n".join(lines) + "\n")
    print((out / "results.md").read_text())


if __name__ == "__main__":
    main()
