"""Evaluate a checkpoint on the SIGNS test set: ``python -m resnet_flax.evaluate --workdir=DIR``.

Prints ``Test Loss`` and ``Test Accuracy`` (each test example counted once) for the newest
checkpoint in DIR, or ``--epoch``. ``--data_dir`` reads the data from elsewhere than the run did.
"""

import json

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


def evaluate_checkpoint(workdir, epoch=None, data_dir=None, batch_size=40) -> dict:
    """Loss and accuracy of a checkpoint on the test split."""
    trained = pretrained.load(workdir, epoch)
    config = trained.config
    if data_dir is not None:
        config.data_dir = data_dir
    test = input_pipeline.load_dataset(config).test
    evaluate = evaluation.Evaluator(trained.model.apply, config.num_classes,
                                    normalization=config.get("normalization", "unit"))
    result = evaluate(trained.variables, evaluation.split_batches(test, batch_size, runtime.make_mesh()))
    return {"test_loss": result["loss"], "test_accuracy": result["accuracy"],
            "examples": result["count"], "epoch": trained.epoch, "data": test.source}


def main(argv):
    del argv
    result = evaluate_checkpoint(FLAGS.workdir, FLAGS.epoch, FLAGS.data_dir, FLAGS.batch_size)
    if FLAGS.json:
        print(json.dumps(result))
    else:
        print(f"checkpoint epoch {result['epoch']}, {result['examples']} test examples from {result['data']}")
        print(f"Test Loss = {result['test_loss']:.4f}\nTest Accuracy = {result['test_accuracy']:.4f}")


if __name__ == "__main__":
    cli.run(main, define_flags)
