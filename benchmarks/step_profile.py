"""Where the main job's train steps spend their time: XLA's operations and the host's work.

    python benchmarks/step_profile.py [--stages=dvae,clip,dalle] [--trace_steps=5] [--top=12]

For each stage of `configs/pipeline_mini.py`, the real compiled train step (built as
`benchmarks/main_job_steps.py` builds it) runs `--trace_steps` times under `jax.profiler.trace`
with XLA:CPU's per-operation trace events on (`--xla_cpu_enable_xprof_traceme`). Printed per
step: the wall time; the summed time of XLA's operations (more than the wall time when the cores run
operations side by side); that time by kind of operation (`ynn_fusion`: convolutions and
matmuls handed to the YNNPACK library; `copy`/`transpose`: layout changes; the rest
elementwise and reduction loops); and the longest operations, each with its output shape,
what it computes (a fusion's root operation and operands) and the model code it comes from.

Then the input pipeline's host work per example, timed on this thread alone: reading and
decoding a record, and preparing it (augmentation, tokenisation, CLIP's hard negatives and
negative image), and what that comes to per batch. In training it runs beside the step on the
same cores.
"""
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import xla_trace  # noqa: E402

# Per-operation trace events must be on before XLA's CPU client starts.
xla_trace.enable_operation_events()
import main_job_steps  # noqa: E402  (sets up the path and the huge-page restart)

import jax  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402

from dalle_jax import pipeline  # noqa: E402
from dalle_jax.data import input_pipeline, sources  # noqa: E402

# --stages (which stages) and --config (the pipeline config) are main_job_steps' flags.
flags.DEFINE_integer("trace_steps", 5, "Steps traced per stage.")
flags.DEFINE_integer("top", 12, "Longest operations listed per stage.")
flags.DEFINE_integer("host_examples", 640, "Examples timed for the host's work.")
FLAGS = flags.FLAGS

def profile_step(stage_config, trainer, steps: int, top: int) -> None:
    batches = trainer.batches(stage_config.data.train_split, training=True)
    state = trainer.init_state()
    batch = next(batches)
    batches.close()
    trainer.compile_train_step(state, batch)
    for _ in range(3):  # warm
        state, metrics = trainer.train_step(state, batch)
    jax.block_until_ready(metrics)
    with xla_trace.traced_operations() as seconds:
        start = time.perf_counter()
        for _ in range(steps):
            state, metrics = trainer.train_step(state, batch)
        jax.block_until_ready(metrics)
        wall = (time.perf_counter() - start) / steps
    hlo = trainer.compiled_train_step.as_text()
    total = sum(seconds.values()) / steps
    by_kind = {name: s / steps for name, s in xla_trace.by_kind(seconds).items()}
    print(f"\n## {trainer.task.name}, batch {stage_config.data.batch_size}: {1e3 * wall:.1f} ms "
          f"a step (traced), XLA operations {1e3 * total:.1f} ms summed\n")
    print("| kind of operation | ms a step | share of the summed time |\n|---|---|---|")
    for name, s in sorted(by_kind.items(), key=lambda x: -x[1])[:8]:
        print(f"| {name} | {1e3 * s:.1f} | {s / total:.2f} |")
    copies = sum(s for name, s in by_kind.items() if "copy" in name or "transpose" in name)
    print(f"| every layout copy (kinds named copy or transpose) | {1e3 * copies:.1f} | "
          f"{copies / total:.2f} |")
    print("\n| longest operations | ms a step | output, computes, from |\n|---|---|---|")
    for name, s in seconds.most_common(top):
        print(f"| {name} | {1e3 * s / steps:.2f} | {xla_trace.describe(name, hlo)} |")


def profile_host(stage_config, trainer, examples: int) -> str:
    data = stage_config.data
    source = sources.data_source(sources.prepared_builder(data), data.train_split)
    prepare = input_pipeline.PrepareExample(data, stage_config.text, trainer.tokenizer, True)
    count = min(examples, len(source))
    start = time.perf_counter()
    records = [source[i] for i in range(count)]
    read = (time.perf_counter() - start) / count
    rng = np.random.default_rng(0)
    start = time.perf_counter()
    for index, record in enumerate(records):
        prepare.random_map((index, record), rng)
    prepared = (time.perf_counter() - start) / count
    return (f"| {trainer.task.name} | {1e6 * read:.0f} µs | {1e6 * prepared:.0f} µs | "
            f"{1e3 * (read + prepared) * data.batch_size:.1f} ms a batch of {data.batch_size} |")


def main(argv):
    del argv
    config = FLAGS.config  # main_job_steps' flag, with its overrides
    with tempfile.TemporaryDirectory() as workdir:
        pipeline.train_tokenizer(config, workdir)
        print(f"devices: {jax.device_count()} × {jax.devices()[0].platform}; "
              f"{FLAGS.trace_steps} steps traced per stage")
        host_rows = []
        for stage in FLAGS.stages:
            stage_config, trainer = main_job_steps.stage_trainer(stage, config, workdir)
            profile_step(stage_config, trainer, FLAGS.trace_steps, FLAGS.top)
            host_rows.append(profile_host(stage_config, trainer, FLAGS.host_examples))
        print("\nThe input pipeline's host work on one thread, per training example:\n")
        print("| stage | read and decode | prepare | together |\n|---|---|---|---|")
        print("\n".join(host_rows))
    print("\ncommand: python benchmarks/step_profile.py " + " ".join(sys.argv[1:]))


if __name__ == "__main__":
    app.run(main)
