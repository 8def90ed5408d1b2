"""Evaluates a pipeline's models the way the paper's claims are stated, and writes a report.

    python -m dalle_jax.evaluate --workdir workdirs/mini [--captions 200] [--candidates 256]
        [--temperature 0.7] [--top_k 0] [--guidance 1.5,2]

For the distinct captions of the `validation` split and of `heldout` (colour-shape pairs the
models never saw), images are drawn and judged from pixels (`evaluation/captions.py`): plain
sampling and classifier-free guidance at a few scales, each also reranked (best of N by
CLIP). Beside them: the dVAE's reconstruction PSNR and objects kept, CLIP's recall and
zero-shot accuracy, and how often the CLIPs score a scene with a named object missing at least as
high as the true scene (`evaluation/missing_objects.py`).
Writes `evaluation/report.md`, `report.json` and one image grid per split and setting
(rows: captions, columns: images) into the workdir, and prints the report.
"""
from __future__ import annotations

import dataclasses
import json
import math
import re
import time

from absl import flags

from dalle_jax import cli, files as files_lib
from dalle_jax import workdir as workdir_lib
from dalle_jax.data.examples import load_examples
from dalle_jax.evaluation import captions as captions_lib
from dalle_jax.evaluation import missing_objects
from dalle_jax.evaluation.reconstruction import reconstruction_report
from dalle_jax.evaluation.retrieval import retrieval_report
from dalle_jax.sampling.generator import Generator, Settings
from dalle_jax.sampling.outputs import grid_of, to_pixels

SPLITS = ("validation", "heldout")


@dataclasses.dataclass(frozen=True)
class Options:
    captions: int = 200  # distinct captions per split
    candidates: int = 256  # images drawn per caption, as the main job's samples
    keep: int = 1  # images kept by CLIP per caption
    guidance: tuple[float, ...] = (1.5, 2.0)  # guidance scales besides plain sampling
    temperature: float = 0.7  # as the main job's samples; 1 = the model's own distribution
    top_k: int = 0
    top_p: float = 1.0
    batch_size: int = 128  # images per compiled call
    seed: int = 0
    reference_examples: int = 500  # examples for the dVAE and CLIP figures (per split)
    splits: tuple[str, ...] = SPLITS  # whose captions are drawn and judged

    def check(self) -> None:
        """A one-line ValueError for the first bad value, before any model is loaded."""
        Settings(self.temperature, self.top_k, self.top_p)
        if self.captions < 1 or self.candidates < 1 or self.batch_size < 1:
            raise ValueError(f"captions={self.captions}, candidates={self.candidates} and "
                             f"batch_size={self.batch_size} must be positive")
        unknown = [split for split in self.splits if split not in SPLITS]
        if unknown or not self.splits:
            raise ValueError(f"splits={','.join(self.splits)} must be some of {','.join(SPLITS)}")
        if not 1 <= self.keep <= self.candidates:
            raise ValueError(f"keep={self.keep} must be between 1 and candidates="
                             f"{self.candidates}")


def define_flags() -> None:
    """The command's flags, defined only when it runs (importing the module defines none)."""
    defaults = Options()
    flags.DEFINE_string("workdir", None, "A pipeline workdir (with dvae/, clip/ and dalle/).")
    flags.DEFINE_integer("captions", defaults.captions, "Distinct captions per split.")
    flags.DEFINE_integer("candidates", defaults.candidates,
                         "Images drawn per caption (256, as the main job's samples).")
    flags.DEFINE_integer("keep", defaults.keep, "Images kept by CLIP per caption.")
    flags.DEFINE_list("guidance", [f"{g:g}" for g in defaults.guidance],
                      "Guidance scales besides plain sampling, comma-separated ('' for none).")
    flags.DEFINE_float("temperature", defaults.temperature,
                       "Sampling temperature of every setting (0.7, as the main job's samples; "
                       "1 draws from the model's own distribution).")
    flags.DEFINE_integer("top_k", defaults.top_k, "Sample among the k likeliest image tokens "
                         "(0 = all).")
    flags.DEFINE_float("top_p", defaults.top_p, "Nucleus cut (1 = none).")
    flags.DEFINE_integer("batch_size", defaults.batch_size, "Images per compiled call.")
    flags.DEFINE_integer("seed", defaults.seed, "Seed of the first setting's draws.")
    flags.DEFINE_integer("reference_examples", defaults.reference_examples,
                         "Examples for the dVAE and CLIP figures (the missing-object check "
                         "takes as many of each split).")
    flags.DEFINE_list("splits", list(defaults.splits), "Splits whose captions are judged.")
    flags.mark_flags_as_required(["workdir"])


def slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_")


def write_grids(out: str, split: str, images: dict, rows: int = 8) -> dict[str, str]:
    files = {}
    for name, per_caption in images.items():
        chosen = per_caption[:rows]
        k = chosen.shape[1]
        grid = grid_of(to_pixels(chosen.reshape(-1, *chosen.shape[2:])), k)
        files[name] = f"{split}_{slug(name)}.png"
        files_lib.write_png(files_lib.join(out, files[name]), grid)
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
    attributes = captions_lib.ATTRIBUTES
    settings = report["settings"]
    lines = [f"# Evaluation of {report['workdir']}", "",
             f"{settings['candidates']} images per caption, temperature "
             f"{settings['temperature']:g}, top_k {settings['top_k']}, top_p "
             f"{settings['top_p']:g}, seed {settings['seed']}.", ""]
    for split, result in report["splits"].items():
        lines += [f"## `{split}`: {result['captions']} captions", "",
                  "| setting | images | " + " | ".join(attributes) + " | any draw matches |",
                  "|---|---|" + "---|" * (len(attributes) + 1)]
        for name, rates in result["rates"].items():
            lines.append(f"| {name} | {rates['images']} | "
                         + " | ".join(percent(rates[a]) for a in attributes)
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
    missing = report.get("missing_objects")
    if missing:
        lines += ["## CLIP and missing objects", "",
                  "How often a judge scores the scene with a named object removed, or the empty "
                  "scene, at least as high as the true scene for its caption (lower is better):",
                  "", "| split | judge | one removed | empty | all variants |",
                  "|---|---|---|---|---|"]
        for split, judges in missing.items():
            for name, rates in judges.items():
                lines.append(f"| `{split}` | {name} | {percent(rates.get('one_removed'))} | "
                             f"{percent(rates.get('empty'))} | {percent(rates['all'])} of "
                             f"{rates['variants']} |")
        lines.append("")
    return "\n".join(lines)


def evaluate(workdir: str, options: Options = Options()) -> dict:
    """Draws, judges and reports as the module doc says; the report (also written to
    `workdir/evaluation/`)."""
    options.check()
    generate = Generator.from_workdir(workdir, batch_size=options.batch_size)
    config = workdir_lib.read_config(workdir_lib.transformer_and_rerankers(workdir)[0])
    out = files_lib.join(workdir, "evaluation")
    files_lib.make_dirs(out)
    report = {"workdir": files_lib.absolute(workdir), "settings": dataclasses.asdict(options),
              "splits": {}}
    start = time.time()
    for split in options.splits:
        examples = load_examples(config, split)
        chosen = captions_lib.distinct_captions(examples.captions, options.captions)

        def show(name, rates, split=split):
            print(f"[{split}] {name}: match {percent(rates['match'])} "
                  f"({(time.time() - start) / 60:.1f} min)", flush=True)

        rates, images = captions_lib.evaluate_captions(
            generate, chosen, candidates=options.candidates, keep=options.keep,
            guidance_scales=options.guidance, seed=options.seed, on_rates=show,
            temperature=options.temperature, top_k=options.top_k, top_p=options.top_p)
        report["splits"][split] = {"captions": len(chosen), "rates": rates,
                                   "grids": write_grids(out, split, images)}
    reference = load_examples(config, limit=options.reference_examples)
    dvae = reconstruction_report(generate.codec, reference.images, reference.objects)
    report["dvae"] = {k: v for k, v in dvae.items() if k != "failures"}
    if generate.scorer is not None:
        report["clip"] = retrieval_report(generate.scorer, reference)
        if reference.objects is not None:
            report["missing_objects"] = missing_objects.rates_by_split(
                generate.scorer, config, options.reference_examples)
    files_lib.write_text(files_lib.join(out, "report.json"),
                         json.dumps(report, indent=1, default=float))
    text = markdown(report)
    files_lib.write_text(files_lib.join(out, "report.md"), text + "\n")
    print(text)
    print(f"\nreport and grids in {out}")
    return report


def guidance_scales(values: list[str]) -> tuple[float, ...]:
    try:
        return tuple(float(value) for value in values if value.strip())
    except ValueError:
        raise ValueError(f"--guidance={','.join(values)} must be comma-separated numbers") from None


def main(argv) -> None:
    del argv
    options = Options(
        captions=flags.FLAGS.captions, candidates=flags.FLAGS.candidates, keep=flags.FLAGS.keep,
        temperature=flags.FLAGS.temperature, top_k=flags.FLAGS.top_k, top_p=flags.FLAGS.top_p,
        batch_size=flags.FLAGS.batch_size, seed=flags.FLAGS.seed,
        reference_examples=flags.FLAGS.reference_examples, splits=tuple(flags.FLAGS.splits))
    try:
        options = dataclasses.replace(options, guidance=guidance_scales(flags.FLAGS.guidance))
        evaluate(flags.FLAGS.workdir, options)
    except (ValueError, FileNotFoundError) as e:
        cli.fail(e)


if __name__ == "__main__":
    define_flags()
    cli.run(main)
