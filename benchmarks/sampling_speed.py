"""Images/s of the main job's sampling stage and of `dalle_jax.evaluate`, on a trained workdir.

    python benchmarks/sampling_speed.py --workdir workdirs/mini [--captions=8] [--repeats=2]

The workdir is the main job's (`python train.py --config configs/pipeline_mini.py --workdir
workdirs/mini`); the models' weights do not change the work, so a run of a few steps per stage
measures the same (e.g. `--config.dvae.train.steps=20 --config.clip.train.steps=20
--config.grey_clip.train.steps=20 --config.dalle.train.steps=20`). It is copied to a temporary
directory first, so nothing in it is overwritten. Timed, in this order:
1. the main job's sampling stage, `pipeline.draw_samples` with `configs/pipeline_mini.py`'s
   samples (6 prompts × 256 candidates, guidance 1.5, reranked by the CLIPs, written as PNGs):
   once from a fresh process state (loading, compiling: what the job spends) and then
   --repeats more times (best kept); images/s = prompts × candidates / seconds;
2. `dalle_jax.evaluate` on the validation split with --captions captions and its other
   defaults (256 candidates, plain and guidance 1.5 and 2, reranked; judging included), with
   --reference_examples examples for its dVAE and CLIP figures: images/s = captions × 256 × 3 /
   seconds of the whole call, compilation included.
Run it at two commits on the same host, one after the other, to compare them.
"""
import os
import shutil
import subprocess
import sys
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from absl import app, flags  # noqa: E402

flags.DEFINE_string("workdir", None, "A trained main-job workdir (with dvae/, clip/, dalle/).")
flags.DEFINE_integer("captions", 8, "Validation captions evaluate draws for.")
flags.DEFINE_integer("repeats", 2, "Warm runs of the sampling stage (best is kept).")
flags.DEFINE_integer("reference_examples", 64, "Examples for evaluate's dVAE and CLIP figures.")
flags.mark_flag_as_required("workdir")
FLAGS = flags.FLAGS


def commit() -> str:
    try:
        return subprocess.run(["git", "-C", ROOT, "rev-parse", "--short", "HEAD"],
                              capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def main(argv):
    del argv
    from dalle_jax import config_lib, evaluate, pipeline

    print(f"command: python benchmarks/sampling_speed.py --workdir={FLAGS.workdir} "
          f"--captions={FLAGS.captions} --repeats={FLAGS.repeats} "
          f"--reference_examples={FLAGS.reference_examples}  (code at {commit()})")
    config = config_lib.load("pipeline_mini")
    images = len(config.samples.prompts) * config.samples.candidates
    with tempfile.TemporaryDirectory() as scratch:
        workdir = os.path.join(scratch, "workdir")
        shutil.copytree(FLAGS.workdir, workdir)
        times = []
        for _ in range(1 + FLAGS.repeats):
            start = time.perf_counter()
            pipeline.draw_samples(config, workdir)
            times.append(time.perf_counter() - start)
        print(f"[1] sampling stage, {images} images: first {times[0]:.1f} s "
              f"({images / times[0]:.1f} images/s, loading and compiling included); warm "
              f"{min(times[1:]):.1f} s ({images / min(times[1:]):.1f} images/s)")
        options = evaluate.Options(captions=FLAGS.captions, splits=("validation",),
                                   reference_examples=FLAGS.reference_examples)
        start = time.perf_counter()
        evaluate.evaluate(workdir, options)
        seconds = time.perf_counter() - start
        drawn = FLAGS.captions * options.candidates * (1 + len(options.guidance))
        print(f"[2] evaluate, validation, {FLAGS.captions} captions: {drawn} images in "
              f"{seconds:.1f} s = {drawn / seconds:.1f} images/s (judging, the dVAE and CLIP "
              f"figures and compiling included)")


if __name__ == "__main__":
    app.run(main)
