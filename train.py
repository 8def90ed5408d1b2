"""Trains a stage of DALL·E: `python train.py --config configs/<x>.py --workdir DIR`.

The config's `task.name` says which model (e.g. `configs/dvae_mini.py` trains the dVAE);
restarting with the same workdir resumes from its latest checkpoint. A pipeline config
(`configs/pipeline_mini.py`) trains every stage in turn and draws samples. A config without a task
(`configs/mini.py`) builds the mesh and the input pipeline and reports a batch's shapes,
sharding and the pipeline's throughput.
"""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # TensorFlow serves TFDS only: keep it quiet.

from absl import flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from dalle_jax import cli, files  # noqa: E402

config_flags.DEFINE_config_file("config", None, "Path to a config file in configs/.",
                                lock_config=True)
flags.DEFINE_string("workdir", None, "Directory for this run's tokenizer, logs and checkpoints.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    del argv
    try:
        run(flags.FLAGS.config, flags.FLAGS.workdir)
    except (ValueError, FileNotFoundError, files.NotWritable) as e:  # bad input: one line
        cli.fail(e)


def run(config, workdir: str) -> None:
    # Imported after flag parsing: --help stays fast.
    from dalle_jax import pipeline
    from dalle_jax.training import setup

    if pipeline.is_pipeline(config):
        samples = pipeline.run_pipeline(config, workdir)
        if samples is not None:
            print(f"images: {files.absolute(samples)}/grid_*.png (one grid per caption; "
                  "samples.json says which is which)")
        return
    if config.task.name:
        state = pipeline.train_stage(config, workdir)
        print(f"trained {config.task.name} to step {int(state.step)}; logs, image grids and "
              f"checkpoints are in {workdir}")
        return
    report = setup.input_report(config, workdir)
    print(f"mesh {report['mesh']}, tokenizer {report['tokenizer']['path']} "
          f"({report['tokenizer']['vocab_size']} pieces)")
    for key, spec in report["batch"].items():
        print(f"  batch[{key!r}]: {spec['dtype']}{spec['shape']} sharded {spec['sharding']}")
    print(f"  first caption: {report['first_caption']!r}")
    speed = report["throughput"]
    print(f"input pipeline: {speed['examples_per_second']:.0f} examples/s "
          f"({speed['examples']} examples in {speed['seconds']:.2f} s)")


if __name__ == "__main__":
    cli.run(main)
