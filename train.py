"""Trains a stage of DALL·E: `python train.py --config configs/<x>.py --workdir DIR`.

Until the models land, this builds the mesh and the input pipeline for the config and reports
a batch's shapes, sharding and the pipeline's throughput.
"""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # TensorFlow serves TFDS only: keep it quiet.

from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

config_flags.DEFINE_config_file("config", None, "Path to a config file in configs/.",
                                lock_config=True)
flags.DEFINE_string("workdir", None, "Directory for this run's tokenizer, logs and checkpoints.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    del argv
    from dalle_jax import run  # After flag parsing: --help stays fast.

    report = run.input_report(flags.FLAGS.config, flags.FLAGS.workdir)
    print(f"mesh {report['mesh']}, tokenizer {report['tokenizer']['path']} "
          f"({report['tokenizer']['vocab_size']} pieces)")
    for key, spec in report["batch"].items():
        print(f"  batch[{key!r}]: {spec['dtype']}{spec['shape']} sharded {spec['sharding']}")
    print(f"  first caption: {report['first_caption']!r}")
    speed = report["throughput"]
    print(f"input pipeline: {speed['examples_per_second']:.0f} examples/s "
          f"({speed['examples']} examples in {speed['seconds']:.2f} s)")


if __name__ == "__main__":
    app.run(main)
