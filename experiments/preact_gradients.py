"""The plain-vs-residual gradient study extended to the pre-activation ResNet.

``vanishing_gradients.py`` found that in the assignment's ResNet-50 (BatchNorm after every conv)
the kernel gradient grows from the last layer towards the first at initialisation, far more in
the plain twin without shortcuts, and that the plain twin trains much worse. He et al. (2016)
moved BatchNorm and ReLU before each conv so that the shortcuts carry the signal unchanged. This
measures the same on four nets built by this project, on SIGNS:

* ResNet-50 and its plain twin in the assignment's (post-activation) layout;
* ResNet-50 and its plain twin in the pre-activation layout (``variant='preact'``).

1. At initialisation: the L2 norm of each main-path kernel's gradient (conv1, the 48 block convs,
   the output layer), in forward order, averaged over 4 batches of 32 (``vanishing_gradients``'s
   gradient function: the training step's loss, stopped before the update).
2. Training: ``train.train_and_evaluate`` with the assignment's recipe (Adam 1e-3, batch 32, no
   augmentation), ``--epochs`` epochs, then test accuracy with BatchNorm statistics re-estimated.

    python experiments/preact_gradients.py [--epochs 5] [--workdir runs/preact_gradients]
"""

import argparse
import json
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from matplotlib.figure import Figure

EXPERIMENTS = Path(__file__).resolve().parent
sys.path[:0] = [str(EXPERIMENTS.parent), str(EXPERIMENTS)]

import vanishing_gradients as study  # noqa: E402

from resnet_flax import checkpoints, input_pipeline, models, steps, summary, train  # noqa: E402
from resnet_flax.config import default_config  # noqa: E402

NETS = (("resnet50", "assignment"), ("plain50", "assignment"), ("resnet50", "preact"), ("plain50", "preact"))
OUT = EXPERIMENTS / "preact_gradients"


def label(model: str, variant: str) -> str:
    return f"{model} ({'post-activation' if variant == 'assignment' else 'pre-activation'})"


def main_path_layers(model, variables) -> dict:
    """``{name: module path}`` of every conv and dense kernel on the main path, in forward order
    (shortcut projections left out: they run beside the blocks they bypass)."""
    images = jax.ShapeDtypeStruct((1, 64, 64, 3), jnp.float32)
    ordered = summary.forward_order(model, variables, images)
    layers = {}
    for name, path in ordered.items():
        leaves = variables["params"]
        for key in path:
            leaves = leaves[key]
        shortcut = path[-1].startswith("downsample") or path[-1].endswith("_branch1")
        if "kernel" in leaves and not shortcut:
            layers[path[-1] if isinstance(model, models.ResNet) else name] = path
    return layers


def measure(model_name: str, variant: str, dataset, args) -> dict:
    config = default_config()
    config.update(model=model_name, variant=variant, num_epochs=args.epochs, bn_recalibration_batches=34,
                  checkpoint_every_epochs=args.epochs)
    model = models.model_from_config(config)
    state = steps.create_train_state(config, model, steps_per_epoch=34)
    variables, _ = checkpoints.split_state(state)
    layers = main_path_layers(model, variables)
    init = study.measure_at_init(study.make_gradient_fn(layers, config.num_classes), state, dataset.train,
                                 config, num_batches=4)
    start = time.perf_counter()
    run_dir = Path(args.workdir) / f"{model_name}_{variant}"
    result = train.train_and_evaluate(config, run_dir)
    epochs = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    order = list(layers)
    norms = [init["mean"][n] for n in order]
    return {"model": model_name, "variant": variant, "layers": order, "init_grad_norms": norms,
            "train_loss": [e["train_loss"] for e in epochs], "train_accuracy": [e["train_accuracy"] for e in epochs],
            "recalibrated_test_accuracy": result["recalibrated_test_accuracy"],
            "seconds": time.perf_counter() - start}


def plot(results: list[dict], path: Path) -> None:
    figure = Figure(figsize=(11, 4.5))
    norms_axis, loss_axis = figure.subplots(1, 2)
    for r, color, style in zip(results, ("tab:blue", "tab:red", "tab:green", "tab:orange"), ("-", "-", "--", "--")):
        name = label(r["model"], r["variant"])
        norms_axis.plot(np.arange(1, len(r["layers"]) + 1), r["init_grad_norms"], style, color=color, label=name)
        loss_axis.plot(np.arange(1, len(r["train_loss"]) + 1), r["train_loss"], style + "o", color=color, label=name)
    norms_axis.set(yscale="log", xlabel="layer in forward order (conv1 ... output layer)",
                   ylabel="||dL/dW|| at initialisation", title="kernel-gradient norm per layer")
    loss_axis.set(yscale="log", xlabel="epoch", ylabel="training loss", title="training (Adam 1e-3, batch 32)")
    for axis in (norms_axis, loss_axis):
        axis.grid(alpha=0.3, which="both")
        axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=110)


def write_report(results: list[dict], args, started: str, out: Path) -> None:
    lines = [
        "# Gradients at initialisation and training: post- and pre-activation, residual and plain", "",
        f"Command: `python experiments/preact_gradients.py --epochs {args.epochs}`, started {started}.",
        f"Machine: {study.machine_info()['cpu']}, {study.machine_info()['cores']} cores, jax "
        f"{jax.__version__}.", "",
        "Gradient norms: mean over 4 training batches of 32 at initialisation (seed 0); ratio = first "
        "conv / last main-path conv; growth per layer = the ratio's geometric mean over the 48 layers "
        "between them. Training: SIGNS, Adam 1e-3, batch 32, no augmentation; test accuracy with BatchNorm "
        "statistics re-estimated over the training set.", "",
        "| net | first conv | last conv | ratio | growth per layer | train loss by epoch | train accuracy | "
        "test accuracy (re-estimated BN) | s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        first, last = r["init_grad_norms"][0], r["init_grad_norms"][-2]
        ratio = first / last
        growth = ratio ** (1 / (len(r["layers"]) - 2))
        losses = " / ".join(f"{x:.3f}" for x in r["train_loss"])
        lines.append(f"| {label(r['model'], r['variant'])} | {first:.3g} | {last:.3g} | {ratio:.3g} | {growth:.3f} | "
                     f"{losses} | {r['train_accuracy'][-1]:.3f} | {r['recalibrated_test_accuracy']:.3f} | "
                     f"{r['seconds']:.0f} |")
    lines += ["", "Plot: `gradients.png` (left: per-layer norms at initialisation; right: training loss). "
              "Every number: `results.json`."]
    (out / "results.md").write_text("\n".join(lines) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--workdir", default="runs/preact_gradients")
    parser.add_argument("--out", default=str(OUT))
    args = parser.parse_args()
    started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    dataset = input_pipeline.load_dataset(default_config())
    results = [measure(model, variant, dataset, args) for model, variant in NETS]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=1))
    plot(results, out / "gradients.png")
    write_report(results, args, started, out)
    print((out / "results.md").read_text())


if __name__ == "__main__":
    main()
