"""Evaluates a pipeline's models the way the paper's claims are stated, and writes a report.

    python -m dalle_jax.evaluate --workdir workdirs/mini [--captions 200] [--candidates 256]
        [--temperature 0.7] [--top_k 0] [--guidance 1.5,2]

For the distinct captions of the `validation` split and of `heldout` (colour-shape pairs the
models never saw), images are drawn and judged from pixels (`evaluation/captions.py`): plain
sampling and classifier-free guidance at a few scales, each also reranked (best of N by
CLIP). Beside them: the dVAE's reconstruction PSNR and objects kept, CLIP's recall and
zero-shot accuracy.
Writes `evaluation/report.md`, `report.json` and one image grid per split and setting
(rows: captions, columns: images) into the workdir, and prints the report.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re
import time

SPLITS = ("validation", "heldout")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", required=True,
                        help="a pipeline workdir (with dvae/, clip/ and dalle/)")
    parser.add_argument("--captions", type=int, default=200, help="distinct captions per split")
    parser.add_argument("--candidates", type=int, default=256,
                        help="images drawn per caption (256, as the main job's samples)")
    parser.add_argument("--keep", type=int, default=1, help="images kept by CLIP per caption")
    parser.add_argument("--guidance", default="1.5,2", help="guidance scales, comma-separated "
                        "('' for none; 3 drew fewer matches than 2 in every run so far)")
    parser.add_argument("--temperature", type=float, default=0.7,
                        help="sampling temperature of every setting (0.7, as the main job's "
                             "samples; 1 draws from the model's own distribution)")
    parser.add_argument("--top_k", type=int, default=0,
                        help="sample among the k likeliest image tokens (0 = all)")
    parser.add_argument("--top_p", type=float, default=1.0, help="nucleus cut (1 = none)")
    parser.add_argument("--batch_size", type=int, default=128,
                        help="images per compiled call (128 draws 1.2-1.6x the images/s of 32 "
                             "on a 2-core CPU)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--reference_examples", type=int, default=500,
                        help="validation examples for the dVAE and CLIP figures")
    return parser.parse_args(argv)


def slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_")


def write_grids(out: str, split: str, images: dict, rows: int = 8) -> dict[str, str]:
    from PIL import Image

    from dalle_jax.sampling.outputs import grid_of, to_pixels

    files = {}
    for name, per_caption in images.items():
        chosen = per_caption[:rows]
        k = chosen.shape[1]
        grid = grid_of(to_pixels(chosen.reshape(-1, *chosen.shape[2:])), k)
        files[name] = f"{split}_{slug(name)}.png"
        Image.fromarray(grid).save(os.path.join(out, files[name]))
    return files


def percent(x) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:.1f}%"


def best_of_table(rates: dict) -> list[str]:
    """Markdown lines: per reranked setting, the caption-match rate of CLIP's best of n for
    the n of its curve (none without a scorer)."""
    curves = {name: r["best_of"] for name, r in rates.items() if r.get("best_of")}
    if not curves:
        return []
    sizes = sorted({int(n) for curve in curves.values() for n in curve})
    lines = ["Best of n by CLIP, from the same draws (caption match; mean over the disjoint "
             "groups of n):", "", "| setting | " + " | ".join(f"n = {n}" for n in sizes) + " |",
             "|---|" + "---|" * len(sizes)]
    for name, curve in curves.items():
        by_size = {int(n): rate for n, rate in curve.items()}
        lines.append(f"| {name.split(', best')[0]} | "
                     + " | ".join(percent(by_size.get(n)) for n in sizes) + " |")
    return lines + [""]


def markdown(report: dict) -> str:
    from dalle_jax.evaluation.captions import ATTRIBUTES

    settings = report["settings"]
    lines = [f"# Evaluation of {report['workdir']}", "",
             f"{settings['candidates']} images per caption, temperature "
             f"{settings['temperature']:g}, top_k {settings['top_k']}, top_p "
             f"{settings['top_p']:g}, seed {settings['seed']}.", ""]
    for split, result in report["splits"].items():
        lines += [f"## `{split}`: {result['captions']} captions", "",
                  "| setting | images | " + " | ".join(ATTRIBUTES) + " | any draw matches |",
                  "|---|---|" + "---|" * (len(ATTRIBUTES) + 1)]
        for name, rates in result["rates"].items():
            lines.append(f"| {name} | {rates['images']} | "
                         + " | ".join(percent(rates[a]) for a in ATTRIBUTES)
                         + f" | {percent(rates.get('any_match'))} |")
        lines += [""] + best_of_table(result["rates"])
        lines += ["Grids: " + ", ".join(f"[{n}]({f})" for n, f in result["grids"].items()), ""]
    dvae, clip = report.get("dvae"), report.get("clip")
    if dvae:
        lines += ["## dVAE", "", f"PSNR {dvae['psnr']:.2f} dB, objects kept "
                  f"{percent(dvae.get('objects_kept'))}, codes used {percent(dvae['codes_used'])} "
                  f"({dvae['examples']} validation images)", ""]
    if clip:
        zero = clip.get("zero_shot", {})
        lines += ["## CLIP", "", f"text->image recall@1 {percent(clip['text_to_image_recall_at_1'])}, "
                  f"image->text recall@1 {percent(clip['image_to_text_recall_at_1'])} over "
                  f"{clip['examples']} validation examples; zero-shot colour "
                  f"{percent(zero.get('colour_accuracy'))}, shape "
                  f"{percent(zero.get('shape_accuracy'))}, position "
                  f"{percent(zero.get('position_accuracy'))}; relation (true caption over the "
                  f"reversed one) {percent(zero.get('relation_accuracy'))}", ""]
    return "\n".join(lines)


def main(argv=None):
    from dalle_jax import pipeline
    from dalle_jax.evaluation import captions as captions_lib
    from dalle_jax.evaluation.examples import load_examples
    from dalle_jax.evaluation.reconstruction import reconstruction_report
    from dalle_jax.evaluation.retrieval import retrieval_report
    from dalle_jax.models.codec import ImageCodec
    from dalle_jax.sampling.generator import Generator, Settings
    from dalle_jax.training.restore import load_config

    args = parse_args(argv)
    dalle_dir = os.path.join(args.workdir, "dalle")
    try:
        guidance = [float(g) for g in args.guidance.split(",") if g.strip()]
        Settings(args.temperature, args.top_k, args.top_p)  # a bad value fails before loading
        if not 1 <= args.keep <= args.candidates:
            raise ValueError(f"--keep={args.keep} must be between 1 and --candidates="
                             f"{args.candidates}")
        generate = Generator.from_workdir(dalle_dir, batch_size=args.batch_size,
                                          clip_workdir=pipeline.clip_workdirs(args.workdir))
        config = load_config(dalle_dir)
    except (ValueError, FileNotFoundError) as e:
        raise SystemExit(f"evaluate: {e}") from None
    out = os.path.join(args.workdir, "evaluation")
    os.makedirs(out, exist_ok=True)
    report = {"workdir": os.path.abspath(args.workdir), "settings": vars(args), "splits": {}}
    start = time.time()
    for split in SPLITS:
        examples = load_examples(config, split)
        chosen = captions_lib.distinct_captions(examples.captions, args.captions)

        def show(name, rates, split=split):
            print(f"[{split}] {name}: match {percent(rates['match'])} "
                  f"({(time.time() - start) / 60:.1f} min)", flush=True)

        rates, images = captions_lib.evaluate_captions(
            generate, chosen, candidates=args.candidates, keep=args.keep,
            guidance_scales=guidance, seed=args.seed, on_rates=show,
            temperature=args.temperature, top_k=args.top_k, top_p=args.top_p)
        report["splits"][split] = {"captions": len(chosen), "rates": rates,
                                   "grids": write_grids(out, split, images)}
    reference = load_examples(config, limit=args.reference_examples)
    dvae = reconstruction_report(ImageCodec.from_workdir(config.task.dvae_workdir),
                                 reference.images, reference.objects)
    report["dvae"] = {k: v for k, v in dvae.items() if k != "failures"}
    if generate.scorer is not None:
        report["clip"] = retrieval_report(generate.scorer, reference)
    with open(os.path.join(out, "report.json"), "w") as f:
        json.dump(report, f, indent=1, default=float)
    text = markdown(report)
    with open(os.path.join(out, "report.md"), "w") as f:
        f.write(text + "\n")
    print(text)
    print(f"\nreport and grids in {out}")
    return report


if __name__ == "__main__":
    main()
