"""What every command shares: its flags parsed with one-line errors, a mistake the user can fix
(``UserError``, a bad flag, a config file that is missing or broken, an unknown config field)
printed as one line with exit status 1, and a traceback only for bugs, and only with ``--verbose``.

    if __name__ == "__main__":
        cli.run(main, define_flags)
"""

import difflib
import functools
import re
import sys
import traceback
from collections.abc import Callable, Sequence

from absl import app, flags, logging

from resnet_flax.config import load_config_file
from resnet_flax.errors import UserError

FLAGS = flags.FLAGS
_CONFIG_OVERRIDE = re.compile(r"^--config\.([A-Za-z0-9_.]+)(=|$)")


def fail(message: str, status: int = 1) -> None:
    """Prints ``error: message`` (its first line) on stderr and exits."""
    first_line = (message.strip().splitlines() or [""])[0]
    print(f"error: {first_line}", file=sys.stderr, flush=True)
    sys.exit(status)


def run(main: Callable[[list[str]], None], define_flags: Callable[[], None]) -> None:
    """Defines the command's flags and ``--verbose``, then runs ``main`` through absl."""
    define_flags()
    flags.DEFINE_bool("verbose", False, "Print the traceback of an unexpected error (a bug).")
    app.run(functools.partial(_guarded, main), flags_parser=parse_flags)


def parse_flags(argv: Sequence[str]) -> list[str]:
    """absl's flag parsing, with a config file and its ``--config.NAME=VALUE`` overrides checked
    first, so that each mistake is one line naming it."""
    argv = list(argv)
    try:
        if "config" in FLAGS:
            check_config_arguments(argv)
        return FLAGS(argv)
    except (UserError, flags.Error) as e:
        fail(str(e))
    except Exception as e:  # an override's value that the config cannot take
        fail(f"{_config_argument(argv) or 'flags'}: {type(e).__name__}: {e}")


def _config_argument(argv: Sequence[str]) -> str | None:
    for i, arg in enumerate(argv):
        if arg.startswith("--config="):
            return arg.split("=", 1)[1]
        if arg == "--config" and i + 1 < len(argv):
            return argv[i + 1]
    return None


def check_config_arguments(argv: Sequence[str]) -> None:
    """Stops with one line on a ``--config`` file that is missing, is not valid Python or lacks
    ``get_config``, and on an override of a field the config does not have (naming the closest)."""
    value = _config_argument(argv)
    if value is None:
        return  # absl reports the missing required flag
    path, _, arg = value.partition(":")
    config = load_config_file(path, arg or None)
    for item in argv:
        match = _CONFIG_OVERRIDE.match(item)
        if not match:
            continue
        node, parts = config, match.group(1).split(".")
        for depth, name in enumerate(parts):
            fields = list(node.keys()) if hasattr(node, "keys") else []
            if name not in fields:
                where = ".".join(["config", *parts[:depth]])
                close = difflib.get_close_matches(name, fields, n=1)
                hint = f"; did you mean --config.{'.'.join([*parts[:depth], close[0]])}?" if close else ""
                raise UserError(f"--config.{match.group(1)}: {where} has no field {name!r}{hint}")
            node = node[name]


def _guarded(main: Callable[[list[str]], None], argv: list[str]) -> None:
    logging.set_verbosity(logging.ERROR)  # JAX's and orbax's info is noise for a user
    try:
        main(argv)
    except UserError as e:
        fail(str(e), getattr(e, "exit_status", 1))
    except KeyboardInterrupt:
        fail("interrupted", status=130)
    except Exception as e:
        if FLAGS.verbose:
            traceback.print_exc()
            sys.exit(2)
        fail(f"unexpected {type(e).__name__}: {e} (a bug; rerun with --verbose for the traceback)", status=2)
