"""Evaluate a checkpoint on its test set: ``python -m resnet_flax.evaluate --workdir=DIR``.

Prints ``Test Loss`` and ``Test Accuracy`` (each test example counted once) for the newest
checkpoint in DIR, or ``--epoch``, then the accuracy of every class and the confusion matrix
(rows: true class, columns: predicted), and writes the matrix as ``confusion_matrix.png`` into the
workdir. The test set is the one the run trained beside (``config.dataset``); ``--data_dir`` reads
it from elsewhere. Images of another size than the model's are brought to it as ``predict`` does
(the checkpoint's ``preprocessing``), so imported torchvision weights evaluate on SIGNS at 224x224.
"""

import json
from pathlib import Path

import numpy as np
from absl import flags

from resnet_flax import (autotune, checkpoints, cli, datasets, evaluation, feeds, input_pipeline, metrics, models,
                         pretrained, runtime, steps)
from resnet_flax.errors import UserError

FLAGS = flags.FLAGS
MATRIX_IN_TEXT = 20  # classes up to which the matrix is printed whole


def define_flags() -> None:
    """Command-line flags, defined only when run as a command so that importing stays free."""
    flags.DEFINE_string("workdir", None, "A run's workdir (or its checkpoints/ folder).", required=True)
    flags.DEFINE_integer("epoch", None, "Which checkpoint; default the newest.")
    flags.DEFINE_string("data_dir", None, "Where the test data is; default as the run's config says.")
    flags.DEFINE_integer("batch_size", 40, "Evaluation batch size.")
    flags.DEFINE_bool("json", False, "Print one JSON object instead of text.")
    flags.DEFINE_bool("ema", False, "Evaluate the moving average of the weights (config.ema_decay > 0).")


def test_feed(config, class_names: list[str], mesh):
    """The test split the run's config names, brought to the model's input size."""
    if config.dataset == "signs":
        test = input_pipeline.load_dataset(config, any_size=True).test
        if test.images.shape[1:3] != (config.image_size, config.image_size):  # as predict would bring them
            images = np.stack([input_pipeline.resize_image(image, config.image_size, config.preprocessing)
                               for image in test.images])
            test = input_pipeline.Split(images, test.labels, f"{test.source} ({config.preprocessing} to "
                                                             f"{config.image_size}x{config.image_size})")
        return feeds.InMemoryFeed(test, mesh)
    sources = datasets.open_sources(config)
    if sources.class_names != class_names:
        raise UserError(f"{sources.test.description}: its classes {sources.class_names[:6]}... are not the "
                        f"{len(class_names)} the checkpoint was trained on ({class_names[:6]}...)")
    return feeds.make_feed(sources.test, config, mesh)


def evaluate_checkpoint(workdir, epoch=None, data_dir=None, batch_size=40, ema=False) -> dict:
    """Loss, accuracy, per-class accuracy and confusion matrix of a checkpoint (its weights' moving
    average with ``ema``) on the test split."""
    trained = pretrained.load(workdir, epoch, ema)
    config = trained.config
    if data_dir is not None:
        config.data_dir = data_dir
    mesh = runtime.make_mesh()
    feed = test_feed(config, trained.class_names, mesh)
    # The kernels the run evaluated with (its conv_kernels.json), so that the numbers match its own.
    plan = autotune.saved_plan(checkpoints.checkpoint_root(workdir).parent) if autotune.applies(config) else None
    model = models.model_from_config(config, conv_plan=plan.in_mode("eval")) if plan else trained.model
    evaluate = evaluation.Evaluator(model.apply, config.num_classes, normalization=config.normalization,
                                    confusion=True)
    batches = evaluation.EvaluationBatches(feed, batch_size, config.steps_per_chunk, mesh)
    sums = evaluate.total_sums(trained.variables, batches)
    feed.report_skipped("the test set")
    confusion = np.rint(sums["confusion"]).astype(np.int64)
    per_class = confusion.sum(axis=1)
    summary = steps.summarize(sums)
    return {"test_loss": summary["loss"], "test_accuracy": summary["accuracy"],
            "examples": summary["count"], "epoch": trained.epoch, "data": feed.description,
            "class_names": trained.class_names,
            "class_accuracy": [float(confusion[i, i] / n) if n else None for i, n in enumerate(per_class)],
            "class_examples": per_class.tolist(), "confusion_matrix": confusion.tolist()}


def format_report(result: dict) -> str:
    """Per-class accuracy, then the confusion matrix (whole for up to ``MATRIX_IN_TEXT`` classes,
    else its largest off-diagonal cells)."""
    names, matrix = result["class_names"], np.asarray(result["confusion_matrix"])
    width = max(5, *(len(n) for n in names))
    lines = [f"{'class':<{width}}  examples  accuracy"]
    for name, n, accuracy in zip(names, result["class_examples"], result["class_accuracy"]):
        lines.append(f"{name:<{width}}  {n:>8}  {'-' if accuracy is None else f'{accuracy:.4f}':>8}")
    if len(names) <= MATRIX_IN_TEXT:
        cell = max(4, *(len(n) for n in names), len(str(matrix.max())))
        lines.append(f"confusion matrix (rows: true class, columns: predicted)\n{'':<{width}}  "
                     + " ".join(f"{n:>{cell}}" for n in names))
        lines += [f"{name:<{width}}  " + " ".join(f"{v:>{cell}}" for v in row) for name, row in zip(names, matrix)]
    else:
        off = matrix - np.diag(np.diag(matrix))
        worst = np.dstack(np.unravel_index(np.argsort(off, axis=None)[::-1][:10], off.shape))[0]
        lines.append("most frequent confusions (true -> predicted: examples)")
        lines += [f"  {names[i]} -> {names[j]}: {off[i, j]}" for i, j in worst if off[i, j]]
    return "\n".join(lines)


def main(argv):
    del argv
    result = evaluate_checkpoint(FLAGS.workdir, FLAGS.epoch, FLAGS.data_dir, FLAGS.batch_size, FLAGS.ema)
    workdir = checkpoints.checkpoint_root(FLAGS.workdir).parent
    png = workdir / "confusion_matrix.png"
    metrics.plot_confusion(np.asarray(result["confusion_matrix"]), result["class_names"], png,
                           title=f"epoch {result['epoch']}: test accuracy {result['test_accuracy']:.4f}")
    if FLAGS.json:
        print(json.dumps({**result, "confusion_matrix_png": str(png)}))
    else:
        print(f"checkpoint epoch {result['epoch']}, {result['examples']} test examples from {result['data']}")
        print(f"Test Loss = {result['test_loss']:.4f}\nTest Accuracy = {result['test_accuracy']:.4f}")
        print(format_report(result))
        print(f"confusion matrix plot: {Path(png)}")


if __name__ == "__main__":
    cli.run(main, define_flags)
