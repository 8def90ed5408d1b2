"""Samples images from captions: `python sample.py --workdir DIR --prompt "..."`.

The transformer this needs arrives with issue 4 and decoding with issue 5; until then this
entrypoint only checks its arguments and says so.
"""
import os
import sys

from absl import app, flags

flags.DEFINE_string("workdir", None, "A training run's directory.")
flags.DEFINE_string("prompt", None, "A caption to draw.")
flags.mark_flags_as_required(["workdir"])


def main(argv):
    del argv
    workdir = flags.FLAGS.workdir
    if not os.path.isdir(workdir):
        sys.exit(f"sample.py: workdir {workdir!r} does not exist")
    sys.exit(f"sample.py: no trained transformer in {workdir!r}: sampling needs the "
             "transformer stage, which this version of dalle_jax does not have yet")


if __name__ == "__main__":
    app.run(main)
