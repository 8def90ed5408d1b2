"""Images from captions with a trained transformer workdir.

    python sample.py --workdir workdirs/dalle_mini --prompt "a red circle above a blue square" \
        --n 8 --out samples/
    python sample.py --workdir DIR --prompts_file captions.txt --n 4 --guidance 3 --out OUT
    python sample.py --workdir DIR --prompt "..." --image photo.png --keep_rows 4 --out OUT

Writes one PNG per image (`<prompt index>_<image index>.png`), a grid per prompt
(`grid_<prompt index>.png`) and `samples.json` recording prompts, seeds and settings.
A thin layer over `dalle_jax.sampling.generator.Generator`.
"""
import json
import os
import sys

from absl import app, flags, logging

flags.DEFINE_string("workdir", None, "A trained transformer's workdir.")
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
flags.DEFINE_list("mesh_shape", None, "Sample on a mesh over the run's mesh axes, e.g. 2,1,4 "
                  "(images over data, heads over tensor); default: one device.")
flags.mark_flags_as_required(["workdir"])
FLAGS = flags.FLAGS


def read_prompts() -> list[str]:
    prompts = list(FLAGS.prompt)
    if FLAGS.prompts_file:
        with open(FLAGS.prompts_file) as f:
            prompts += [line.strip() for line in f if line.strip()]
    if not prompts:
        raise ValueError("give --prompt or --prompts_file")
    return prompts


def read_image():
    if not FLAGS.image:
        return None
    import numpy as np
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(FLAGS.image) as image:
            return np.asarray(image.convert("RGB"))
    except (OSError, UnidentifiedImageError) as e:
        raise ValueError(f"--image {FLAGS.image!r} is not a readable image ({e})") from None


def grid_of(images, columns: int):
    import numpy as np

    rows = [np.concatenate(list(images[i:i + columns]), axis=1)
            for i in range(0, len(images), columns)]
    rows[-1] = np.pad(rows[-1], ((0, 0), (0, rows[0].shape[1] - rows[-1].shape[1]), (0, 0)))
    return np.concatenate(rows, axis=0)


def write_outputs(prompts, images, out: str) -> None:
    import numpy as np
    from PIL import Image

    os.makedirs(out, exist_ok=True)
    pixels = (np.clip(images, 0, 1) * 255).round().astype(np.uint8)
    n = FLAGS.n
    for p in range(len(prompts)):
        mine = pixels[p * n:(p + 1) * n]
        for i, image in enumerate(mine):
            Image.fromarray(image).save(os.path.join(out, f"{p:03d}_{i:03d}.png"))
        Image.fromarray(grid_of(mine, min(n, 8))).save(os.path.join(out, f"grid_{p:03d}.png"))
    record = {"workdir": os.path.abspath(FLAGS.workdir), "prompts": prompts, "n": n,
              "seed": FLAGS.seed,
              "settings": {k: getattr(FLAGS, k) for k in (
                  "temperature", "top_k", "top_p", "guidance", "image", "keep_rows",
                  "keep_tokens", "attention")},
              "images": [{"prompt": p, "index": i, "key": f"fold_in(key({FLAGS.seed}), {i})",
                          "file": f"{p:03d}_{i:03d}.png"}
                         for p in range(len(prompts)) for i in range(n)]}
    with open(os.path.join(out, "samples.json"), "w") as f:
        json.dump(record, f, indent=1)


def main(argv):
    del argv
    from tqdm import tqdm

    from dalle_jax.sampling.generator import Generator

    try:
        if FLAGS.n < 1:
            raise ValueError(f"--n={FLAGS.n} must be at least 1")
        prompts = read_prompts()
        image = read_image()
        mesh_shape = None if FLAGS.mesh_shape is None else [int(x) for x in FLAGS.mesh_shape]
        generate = Generator.from_workdir(FLAGS.workdir, batch_size=FLAGS.batch_size,
                                          implementation=FLAGS.attention, mesh_shape=mesh_shape)
        with tqdm(total=len(prompts) * FLAGS.n, desc="sampling", unit="image") as bar:
            images = generate(prompts, FLAGS.n, FLAGS.seed, temperature=FLAGS.temperature,
                              top_k=FLAGS.top_k, top_p=FLAGS.top_p, guidance=FLAGS.guidance,
                              image=image, keep_rows=FLAGS.keep_rows,
                              keep_tokens=FLAGS.keep_tokens, progress=bar.update)
    except (ValueError, FileNotFoundError) as e:
        sys.exit(f"sample.py: {e}")
    write_outputs(prompts, images, FLAGS.out)
    logging.warning("wrote %d images for %d prompts to %s", len(images), len(prompts), FLAGS.out)
    print(f"images in {os.path.abspath(FLAGS.out)}")


if __name__ == "__main__":
    app.run(main)
