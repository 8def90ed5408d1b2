"""Input-pipeline throughput: examples/s at 256 px with augmentation and tokenisation.

    python benchmarks/input_pipeline.py [--workers=0,1,2] [--batches=30]

The pipeline reads synthetic_shapes at 256 px (PNG decode), applies the dVAE augmentation
(random square crop, resize to a random side in [9/8, 12/8]·size capped at the crop, random
crop, flip) and tokenises with 10% BPE dropout, then assembles global batches. Because these
machines are shared and noisy, every figure is also given as a ratio to a reference measured in
the same run: the same per-example work (decode, augment, tokenise) in a plain single-threaded
Python loop. A ratio near N with N workers means the pipeline scales with worker processes.
"""
import os
import sys
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
from absl import app, flags, logging  # noqa: E402

flags.DEFINE_string("workers", "0,1,2", "Comma-separated Grain worker counts to measure.")
flags.DEFINE_integer("batches", 30, "Batches timed per setting (after 3 warm-up batches).")
flags.DEFINE_integer("batch_size", 32, "Examples per batch.")
flags.DEFINE_integer("read_threads", 8, "Grain read threads per process.")
flags.DEFINE_integer("image_size", 256, "Side of the images the pipeline outputs.")
flags.DEFINE_string("data_dir", os.path.join(tempfile.gettempdir(), "dalle_jax_bench_tfds"),
                    "Where the benchmark's synthetic_shapes build is kept between runs.")
FLAGS = flags.FLAGS


def bench_config():
    from dalle_jax import config_lib

    config = config_lib.base_config()
    config.data.data_dir = FLAGS.data_dir
    config.data.shapes.image_size = 256
    config.data.shapes.num_train = 2000
    config.data.shapes.num_validation = 100
    config.data.shapes.num_heldout = 100
    config.data.image_size = FLAGS.image_size
    config.data.batch_size = FLAGS.batch_size
    config.data.read_threads = FLAGS.read_threads
    config.data.augment.update(dict(square="random", min_scale=1.125, max_scale=1.5, flip=True))
    config.text.bpe_dropout = 0.1
    config.text.vocab_size = 512
    config.text.length = 64
    config.mesh.shape = (1, 1, 1)
    return config


def reference_rate(config, source, tokenizer, count: int) -> float:
    """Examples/s of the per-example work in a plain loop: the same-run yardstick."""
    from dalle_jax.data import input_pipeline

    prepare = input_pipeline.PrepareExample(config.data, config.text, tokenizer, training=True)
    start = time.perf_counter()
    for i in range(count):
        prepare.random_map((i, source[i % len(source)]), np.random.default_rng(i))
    return count / (time.perf_counter() - start)


def main(argv):
    del argv
    import jax

    from dalle_jax.training import setup
    from dalle_jax.data import input_pipeline, sources
    from dalle_jax.sharding import mesh as mesh_lib

    config = bench_config()
    workdir = tempfile.mkdtemp(prefix="bench_input_")
    mesh, tokenizer = setup.setup(config, workdir)
    mesh = mesh_lib.build_mesh(config.mesh, devices=jax.devices()[:1])
    source = sources.data_source(sources.prepared_builder(config.data), "train")
    reference = reference_rate(config, source, tokenizer, count=FLAGS.batches * FLAGS.batch_size // 2)
    print(f"command: python benchmarks/input_pipeline.py --workers={FLAGS.workers} "
          f"--batches={FLAGS.batches} --batch_size={FLAGS.batch_size} "
          f"--image_size={FLAGS.image_size} --read_threads={FLAGS.read_threads}")
    print(f"cpus: {os.cpu_count()}; reference (plain loop, 1 thread): {reference:.0f} examples/s")
    print("| workers | examples/s | ratio to reference |")
    print("|---|---|---|")
    for workers in [int(w) for w in FLAGS.workers.split(",")]:
        config.data.workers = workers
        batches = input_pipeline.global_batches(config, "train", mesh, tokenizer, training=True)
        result = input_pipeline.measure_throughput(batches, FLAGS.batches, warmup=3)
        batches.close()
        rate = result["examples_per_second"]
        print(f"| {workers} | {rate:.0f} | {rate / reference:.2f} |", flush=True)


if __name__ == "__main__":
    logging.set_verbosity(logging.ERROR)
    app.run(main)
