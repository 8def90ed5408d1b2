"""Images from captions with a trained transformer: its workdir, or a pipeline workdir.

    python sample.py --workdir workdirs/dalle_mini --prompt "a red circle above a blue square" \
        --n 8 --out samples/
    python sample.py --workdir DIR --prompts_file captions.txt --n 4 --guidance 3 --out OUT
    python sample.py --workdir DIR --prompt "..." --image photo.png --keep_rows 4 --out OUT
    python sample.py --workdir workdirs/mini --prompt "..." --rerank 64 --keep 4
    python sample.py --workdir DIR --clip_workdir CLIP --prompt "..." --rerank 32 --keep 4

Writes one PNG per image (`<prompt index>_<image index>.png`), a grid per prompt
(`grid_<prompt index>.png`) and `samples.json` recording prompts, seeds and settings. With
`--rerank N --keep K`, N candidates are drawn per prompt, CLIP scores them and the best K are
written (best first); `candidates_<prompt index>.png` shows all N in drawing order and
`samples.json` lists every candidate's score and whether it was kept. A pipeline workdir
(the main job's) reranks with its own CLIPs unless `--clip_workdir` names others.
A thin layer over `dalle_jax.sampling.generator.Generator`.
"""
from absl import flags, logging

from dalle_jax import cli, files

flags.DEFINE_string("workdir", None, "A trained transformer's workdir, or a pipeline workdir.")
flags.DEFINE_multi_string("prompt", [], "A caption to draw (repeatable).")
flags.DEFINE_string("prompts_file", None, "A text file with one caption per line.")
flags.DEFINE_integer("n", 4, "Images per prompt.")
flags.DEFINE_string("out", "samples", "Output directory.")
flags.DEFINE_integer("seed", 0, "Image i of every prompt uses the key fold_in(key(seed), i).")
flags.DEFINE_float("temperature", 1.0, "Sampling temperature; 0 = greedy.")
flags.DEFINE_integer("top_k", 0, "Keep the k most likely tokens (0 = all).")
flags.DEFINE_float("top_p", 1.0, "Keep the smallest set of tokens with this much mass (1 = all).")
flags.DEFINE_float("guidance", 1.0, "Classifier-free guidance scale (1 = none).")
flags.DEFINE_string("image", None, "An image to complete: its top is kept, the rest drawn.")
flags.DEFINE_integer("keep_rows", 0, "Token rows of --image to keep.")
flags.DEFINE_integer("keep_tokens", 0, "Leading tokens of --image to keep (instead of rows).")
flags.DEFINE_integer("batch_size", 8, "Images drawn per compiled call.")
flags.DEFINE_enum("attention", "sparse", ["sparse", "dense"], "Cache reads (dense = reference).")
flags.DEFINE_integer("rerank", 0, "Draw this many candidates per prompt and keep the --keep "
                     "that CLIP scores best (0 = no reranking; then --n images are drawn).")
flags.DEFINE_integer("keep", 1, "Images kept per prompt with --rerank.")
flags.DEFINE_list("clip_workdir", None, "A trained CLIP's workdir for --rerank (default: a "
                  "pipeline workdir's CLIPs); several, comma-separated, rerank together (a "
                  "ClipCommittee).")
flags.DEFINE_enum("dtype", None, ["float32", "bfloat16"], "The transformer's inference dtype: "
                  "parameters cast to it on load, compute and key/value cache in it (default: "
                  "as trained).")
flags.DEFINE_list("mesh_shape", None, "Sample on a mesh over the run's mesh axes, e.g. 2,1,4 "
                  "(images over data, heads over tensor); default: one device.")
flags.DEFINE_bool("distributed", False, "Start on every host of a multi-process job: the hosts "
                  "join (TPU pods and SLURM find each other; else give the three below), draw "
                  "together on --mesh_shape over all their devices, and process 0 writes.")
flags.DEFINE_string("coordinator_address", "", "With --distributed: host:port of process 0.")
flags.DEFINE_integer("num_processes", 0, "With --distributed: how many processes.")
flags.DEFINE_integer("process_id", -1, "With --distributed: this process's index.")
flags.DEFINE_string("cpu_collectives", "", "With --distributed on CPU devices: 'gloo'.")
flags.mark_flags_as_required(["workdir"])
FLAGS = flags.FLAGS


def read_prompts() -> list[str]:
    prompts = list(FLAGS.prompt)
    if FLAGS.prompts_file:
        text = files.read_text(FLAGS.prompts_file)
        prompts += [line.strip() for line in text.splitlines() if line.strip()]
    if not prompts:
        raise ValueError("give --prompt or --prompts_file")
    return prompts


def read_image():
    """--image as uint8 RGB, read as training reads a folder's images (EXIF orientation,
    transparency on white, grey, palette and CMYK images to RGB)."""
    if not FLAGS.image:
        return None
    import numpy as np

    from dalle_jax.data.caption_folder import load_image

    if not files.is_file(FLAGS.image):
        raise ValueError(f"--image {FLAGS.image!r} does not exist")
    image, reason = load_image(FLAGS.image, max_side=0)
    if image is None:
        raise ValueError(f"--image {FLAGS.image!r} is not a readable image ({reason})")
    return np.asarray(image)


def write_outputs(prompts, images, out: str, reranked=None) -> None:
    from dalle_jax import workdir as workdir_lib
    from dalle_jax.sampling.outputs import write_samples

    settings = {k: getattr(FLAGS, k) for k in (
        "temperature", "top_k", "top_p", "guidance", "image", "keep_rows", "keep_tokens",
        "attention", "rerank", "keep", "dtype")}
    # The CLIPs that reranked: those named, or a pipeline workdir's own.
    settings["clip_workdir"] = workdir_lib.transformer_and_rerankers(
        FLAGS.workdir, FLAGS.clip_workdir)[1] if FLAGS.rerank else None
    write_samples(out, prompts, images, seed=FLAGS.seed, settings=settings, reranked=reranked,
                  extra={"workdir": files.absolute(FLAGS.workdir)})


def check_counts(pipeline: bool) -> None:
    if FLAGS.n < 1:
        raise ValueError(f"--n={FLAGS.n} must be at least 1")
    if FLAGS.rerank < 0:
        raise ValueError(f"--rerank={FLAGS.rerank} must be >= 0 (0 = no reranking)")
    if not FLAGS.rerank:
        if FLAGS["keep"].present or FLAGS.clip_workdir:
            raise ValueError("--keep and --clip_workdir only apply with --rerank N")
        return
    if FLAGS["n"].present:
        raise ValueError("with --rerank N --keep K, K images are kept per prompt: drop --n")
    if not 1 <= FLAGS.keep <= FLAGS.rerank:
        raise ValueError(f"--keep={FLAGS.keep} must be between 1 and --rerank={FLAGS.rerank}")
    if not FLAGS.clip_workdir and not pipeline:
        raise ValueError("--rerank needs --clip_workdir, a trained CLIP's workdir (or a "
                         "pipeline --workdir, whose CLIPs rerank)")


def main(argv):
    del argv
    import jax
    import ml_collections
    from tqdm import tqdm

    from dalle_jax import workdir as workdir_lib
    from dalle_jax.sampling.generator import Generator
    from dalle_jax.sharding import mesh as mesh_lib

    mesh_lib.initialize_distributed(ml_collections.ConfigDict(dict(distributed=dict(
        enabled=FLAGS.distributed, coordinator_address=FLAGS.coordinator_address,
        num_processes=FLAGS.num_processes, process_id=FLAGS.process_id,
        cpu_collectives=FLAGS.cpu_collectives))))
    writer = jax.process_index() == 0
    try:
        if FLAGS.distributed and FLAGS.mesh_shape is None:
            raise ValueError("--distributed draws on --mesh_shape over all the job's devices: "
                             "give it")
        check_counts(workdir_lib.is_pipeline(FLAGS.workdir))
        prompts = read_prompts()
        image = read_image()
        mesh_shape = None if FLAGS.mesh_shape is None else [int(x) for x in FLAGS.mesh_shape]
        generate = Generator.from_workdir(FLAGS.workdir, batch_size=FLAGS.batch_size,
                                          implementation=FLAGS.attention, mesh_shape=mesh_shape,
                                          clip_workdir=FLAGS.clip_workdir if FLAGS.rerank else [],
                                          dtype=FLAGS.dtype)
        settings = dict(temperature=FLAGS.temperature, top_k=FLAGS.top_k, top_p=FLAGS.top_p,
                        guidance=FLAGS.guidance, image=image, keep_rows=FLAGS.keep_rows,
                        keep_tokens=FLAGS.keep_tokens)
        drawn = FLAGS.rerank or FLAGS.n
        with tqdm(total=len(prompts) * drawn, desc="sampling", unit="image",
                  disable=not writer) as bar:
            if FLAGS.rerank:
                reranked = generate.best_of(prompts, FLAGS.rerank, FLAGS.keep, FLAGS.seed,
                                            progress=bar.update, **settings)
                images = reranked.images
            else:
                reranked = None
                images = generate(prompts, FLAGS.n, FLAGS.seed, progress=bar.update, **settings)
    except (ValueError, FileNotFoundError) as e:
        cli.fail(e)
    if not writer:  # every host drew the same images; one writes them
        return
    write_outputs(prompts, images, FLAGS.out, reranked)
    logging.info("wrote %d images for %d prompts to %s", len(images), len(prompts), FLAGS.out)
    print(f"images in {files.absolute(FLAGS.out)}")


if __name__ == "__main__":
    cli.run(main)
