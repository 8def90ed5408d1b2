"""What every command does the same way: absl flags, and a log that shows the project's progress.

Each command (`train.py`, `sample.py`, `python -m dalle_jax.serve`, `.evaluate`, `.plan`,
`.evaluation.reconstruction`, `.evaluation.retrieval`, `.evaluation.missing_objects`,
`.convert.openai_dvae`) defines absl flags, starts with `cli.run(main)` and ends a bad input with
`cli.fail(error)`, one line. Its progress goes to `logging.info` and is shown; the
INFO lines of the libraries underneath (TFDS, Orbax, Grain, JAX) are not, as they would bury
it, while their warnings and errors are. An explicit `--verbosity` (`-v 0`) shows everything.
"""
from __future__ import annotations

import logging as std_logging
import os
import sys
from typing import Callable

from absl import app, flags, logging

from dalle_jax import host

PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))


class _OwnInfoOnly(std_logging.Filter):
    """Passes warnings and errors, and INFO lines from this package or the running script."""

    def __init__(self, script: str):
        super().__init__()
        self.sources = (PACKAGE_DIR + os.sep, script)

    def filter(self, record: std_logging.LogRecord) -> bool:
        if record.levelno >= std_logging.WARNING:
            return True
        path = os.path.abspath(record.pathname)
        return path.startswith(self.sources[0]) or path == self.sources[1]


def show_own_progress() -> None:
    """Shows this project's INFO lines and hides other libraries' (see the module doc)."""
    if flags.FLAGS["verbosity"].present:
        return
    logging.set_verbosity(logging.INFO)
    script = os.path.abspath(sys.argv[0]) if sys.argv and sys.argv[0] else ""
    logging.get_absl_handler().addFilter(_OwnInfoOnly(script))


def program() -> str:
    """How the running command was started: `dalle_jax.evaluate` for `python -m ...`, else
    the script's name (`sample.py`)."""
    spec = getattr(sys.modules["__main__"], "__spec__", None)
    return spec.name if spec is not None else os.path.basename(sys.argv[0])


def fail(error: Exception) -> None:
    """Ends the command with a one-line error naming it, e.g. `sample.py: --n=0 must be ...`."""
    sys.exit(f"{program()}: {error}")


def run(main: Callable[[list[str]], None]) -> None:
    """`absl.app.run(main)` with the project's log settings applied first, in a process whose
    malloc uses huge pages for large blocks (`host.use_huge_pages`: the command may start
    again once, before anything else happens)."""
    host.use_huge_pages()

    def with_logging(argv):
        show_own_progress()
        return main(argv)

    app.run(with_logging)
