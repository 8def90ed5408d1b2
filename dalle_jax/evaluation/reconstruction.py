"""How well a trained dVAE keeps what matters: PSNR, codebook use, and objects kept intact.

On `synthetic_shapes` "every object keeps its colour, shape and cell" is checked by the pixel
judge: an image counts as kept when `judge.find_objects` of its reconstruction equals the
data set's own `objects` feature exactly (same colours, shapes and cells, nothing extra).

    python -m dalle_jax.evaluation.reconstruction --workdir workdirs/dvae_mini [--limit 1000]
"""
from __future__ import annotations

import json

import numpy as np
from absl import flags

from dalle_jax import cli
from dalle_jax import workdir as workdir_lib
from dalle_jax.data.examples import load_examples
from dalle_jax.evaluation import judge
from dalle_jax.models.codec import ImageCodec


def psnr(mse: float) -> float:
    return float(10 * np.log10(1.0 / max(mse, 1e-12)))


def codebook_usage(tokens: np.ndarray, vocab_size: int) -> dict[str, float]:
    counts = np.bincount(tokens.reshape(-1), minlength=vocab_size).astype(np.float64)
    p = counts / counts.sum()
    entropy = -np.sum(p[p > 0] * np.log(p[p > 0]))
    return {"codebook_perplexity": float(np.exp(entropy)),
            "codes_used": float(np.mean(counts > 0))}


def reconstruction_report(codec, images: np.ndarray, objects=None, chunk: int = 256) -> dict:
    """Metrics of `codec` (anything with encode/decode and vocab_size) on uint8 `images`.

    With `objects` (one ground-truth list per image) it also reports the share of
    reconstructions the judge reads exactly as the ground truth, and the same share for the
    originals, which bounds what the judge itself can confirm.
    """
    tokens = codec.encode(images)
    recon = np.concatenate([codec.decode(tokens[i:i + chunk])
                            for i in range(0, len(tokens), chunk)])
    recon_u8 = np.clip(np.round(recon * 255), 0, 255).astype(np.uint8)
    mse = float(np.mean((recon - images.astype(np.float32) / 255.0) ** 2))
    report = {"examples": int(len(images)), "mse": mse, "psnr": psnr(mse),
              **codebook_usage(tokens, codec.vocab_size)}
    if objects is not None:
        report["objects_kept"] = judge.agreement(list(recon_u8), objects)
        report["judge_on_originals"] = judge.agreement(list(images), objects)
        report["failures"] = [i for i, (im, ob) in enumerate(zip(recon_u8, objects))
                              if judge.find_objects(im) != judge.as_object_list(ob)][:20]
    return report


def report_for_workdir(workdir: str, limit: int = 0) -> dict:
    """`reconstruction_report` of the dVAE trained in `workdir` on its evaluation split."""
    codec = ImageCodec.from_workdir(workdir)
    examples = load_examples(workdir_lib.read_config(workdir), limit=limit)
    return reconstruction_report(codec, examples.images, examples.objects)


def define_flags() -> None:
    flags.DEFINE_string("workdir", None, "A trained dVAE's workdir.")
    flags.DEFINE_integer("limit", 0, "Examples (0 = the whole split).")
    flags.mark_flags_as_required(["workdir"])


def main(argv) -> None:
    del argv
    try:
        report = report_for_workdir(flags.FLAGS.workdir, flags.FLAGS.limit)
    except (ValueError, FileNotFoundError) as e:
        cli.fail(e)
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    define_flags()
    cli.run(main)
