"""Train and evaluate: ``python -m resnet_flax.main --config=configs/signs.py --workdir=runs/signs``.

Config fields can be overridden on the command line (``--config.num_epochs=20``). Without
``--workdir`` the run goes to ``runs/<config file name>``; a workdir that holds checkpoints resumes.
Several hosts: start the same command on each with ``--coordinator_address=HOST0:PORT
--num_processes=N --process_id=I`` (or under Slurm / Open MPI, where JAX finds these itself).
"""

from pathlib import Path

from absl import app, flags
from ml_collections import config_flags

from resnet_flax import cli

FLAGS = flags.FLAGS


def define_flags() -> None:
    """Command-line flags, defined only when run as a command so that importing stays free."""
    config_flags.DEFINE_config_file("config", None, "Config file (configs/*.py).", lock_config=True)
    flags.DEFINE_string("workdir", None, "Where checkpoints, metrics and plots go (default: runs/<config>).")
    flags.DEFINE_enum("distributed", "auto", ["auto", "on", "off"],
                      "jax.distributed.initialize(): 'auto' when a coordinator is given or a cluster "
                      "launcher (Slurm, Open MPI) started several tasks.")
    flags.DEFINE_string("coordinator_address", None, "HOST:PORT of process 0 (or $JAX_COORDINATOR_ADDRESS).")
    flags.DEFINE_integer("num_processes", None, "Number of processes in a multi-host run.")
    flags.DEFINE_integer("process_id", None, "This process's index in a multi-host run.")
    flags.mark_flags_as_required(["config"])


def default_workdir(config_path: str) -> str:
    return str(Path("runs") / Path(config_path.split(":")[0]).stem)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    from resnet_flax import runtime, train  # JAX: imported once the command line is known to be good

    workdir = FLAGS.workdir or default_workdir(FLAGS["config"].config_filename)
    runtime.initialize_distributed(FLAGS.distributed, FLAGS.coordinator_address, FLAGS.num_processes,
                                   FLAGS.process_id)
    train.train_and_evaluate(FLAGS.config, workdir, verbose=FLAGS.verbose)


if __name__ == "__main__":
    cli.run(main, define_flags)
