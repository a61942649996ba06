"""Evaluate a checkpoint on the SIGNS test set: ``python -m resnet_flax.evaluate --workdir=DIR``.

Prints ``Test Loss`` and ``Test Accuracy`` (each test example counted once) for the newest
checkpoint in DIR, or ``--epoch``. ``--data_dir`` reads the data from elsewhere than the run did.
Images of another size than the model's are brought to it as ``predict`` does (the checkpoint's
``preprocessing``), so imported torchvision weights evaluate on SIGNS at 224x224.
"""

import json

import numpy as np
from absl import flags

from resnet_flax import cli, evaluation, input_pipeline, pretrained, runtime

FLAGS = flags.FLAGS


def define_flags() -> None:
    """Command-line flags, defined only when run as a command so that importing stays free."""
    flags.DEFINE_string("workdir", None, "A run's workdir (or its checkpoints/ folder).", required=True)
    flags.DEFINE_integer("epoch", None, "Which checkpoint; default the newest.")
    flags.DEFINE_string("data_dir", None, "Where SIGNS is; default as the run's config says.")
    flags.DEFINE_integer("batch_size", 40, "Evaluation batch size.")
    flags.DEFINE_bool("json", False, "Print one JSON object instead of text.")
    flags.DEFINE_bool("ema", False, "Evaluate the moving average of the weights (config.ema_decay > 0).")


def evaluate_checkpoint(workdir, epoch=None, data_dir=None, batch_size=40, ema=False) -> dict:
    """Loss and accuracy of a checkpoint (its weights' moving average with ``ema``) on the test split."""
    trained = pretrained.load(workdir, epoch, ema)
    config = trained.config
    if data_dir is not None:
        config.data_dir = data_dir
    test = input_pipeline.load_dataset(config, any_size=True).test
    if test.images.shape[1:3] != (config.image_size, config.image_size):  # as predict would bring them
        images = np.stack([input_pipeline.resize_image(image, config.image_size, config.preprocessing)
                           for image in test.images])
        test = input_pipeline.Split(images, test.labels, f"{test.source} ({config.preprocessing} to "
                                                         f"{config.image_size}x{config.image_size})")
    evaluate = evaluation.Evaluator(trained.model.apply, config.num_classes, normalization=config.normalization)
    result = evaluate(trained.variables, evaluation.split_batches(test, batch_size, runtime.make_mesh()))
    return {"test_loss": result["loss"], "test_accuracy": result["accuracy"],
            "examples": result["count"], "epoch": trained.epoch, "data": test.source}


def main(argv):
    del argv
    result = evaluate_checkpoint(FLAGS.workdir, FLAGS.epoch, FLAGS.data_dir, FLAGS.batch_size, FLAGS.ema)
    if FLAGS.json:
        print(json.dumps(result))
    else:
        print(f"checkpoint epoch {result['epoch']}, {result['examples']} test examples from {result['data']}")
        print(f"Test Loss = {result['test_loss']:.4f}\nTest Accuracy = {result['test_accuracy']:.4f}")


if __name__ == "__main__":
    cli.run(main, define_flags)
