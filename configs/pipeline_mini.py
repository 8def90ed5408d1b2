"""The mini pipeline on this CPU: tokenizer -> dVAE -> CLIP -> transformer -> samples.

python train.py --config configs/pipeline_mini.py --workdir workdirs/mini

Each stage is its own config (configs/dvae_mini.py, clip_mini.py, dalle_mini.py) and can be
changed from the command line through it, e.g. --config.dalle.train.steps=1000. The stages
share the caption tokenizer (`text`); `samples` says what to draw at the end.
"""
import ml_collections

from dalle_jax import config_lib

COLOURS = ("red", "green", "blue", "yellow", "magenta", "cyan")
# Captions for the final grids: seen combinations and held-out colour-shape pairs (yellow
# triangle, blue circle, cyan square and magenta circle never occur in training).
PROMPTS = (
    "a red circle above a blue square",
    "a green triangle to the left of a yellow circle",
    "a magenta square in the bottom right",
    "a cyan triangle and a red square",
    "a yellow triangle",
    "a blue circle below a green square",
)


def get_config():
    config = ml_collections.ConfigDict()
    config.stages = ("dvae", "clip", "grey_clip", "dalle")
    config.text = ml_collections.ConfigDict(dict(length=24, vocab_size=128))
    config.dvae = config_lib.load("dvae_mini")
    config.clip = config_lib.load("clip_mini")
    config.grey_clip = config_lib.load("clip_mini")
    config.dalle = config_lib.load("dalle_mini")
    # The 40-minute budget of the whole job on 2 CPU cores, spent where the caption-match rate
    # gains (measured times in BENCHMARKS.md, "The pipeline"). CLIP trains 6000 steps, twice
    # `clip_mini`'s: it reads relations only after about 3000 (zero-shot relation 67% at the
    # end of a 3000-step schedule, 94.5% after 6000) and then picks matching images more
    # often. The dVAE pays for them with 6000 steps instead of `dvae_mini`'s 12,750 (a dVAE of
    # 8500 steps, sharper, did not move the match rates): its KL weight rises over the first
    # 500, still falls until the last step, and its temperature reaches the end value at 65%
    # of the run, as in the 8500-step schedule these were measured against (warm-up 500,
    # temperature at its end value from step 5500 of 8500).
    config.dvae.train.steps = 6000
    config.dvae.task.kl_warmup_steps = 500
    config.dvae.task.kl_decay_steps = 5500
    config.dvae.task.temperature_steps = 3900
    config.clip.train.steps = 6000
    # A second CLIP that sees grey images with colourless captions only, so it reads shapes
    # whatever their colour, the main CLIP's weak point on unseen colour-shape pairs; it reranks
    # beside the main one (models/scorer.py, ClipCommittee). On the same draws it raised the
    # picks on `validation` from 83.0 / 80.5% to 84.5 / 85.0% at best of 128 (guidance 1.5 / 2;
    # 500 steps: 82.0 / 84.0%, 2000: 84.0 / 77.5%), for about 3 minutes of training
    # (BENCHMARKS.md, "other judges for the pick"). Paying for it with 1000 of the main CLIP's
    # steps, or 1500 of the dVAE's, lost more than it gained.
    config.grey_clip.data.augment.greyscale = 1.0
    config.grey_clip.data.augment.colour_words = COLOURS
    config.grey_clip.train.steps = 1000
    config.dalle.train.steps = 2500
    # Temperature 0.7 with guidance 1.5: on the same 16 draws of 200 validation captions, CLIP's
    # pick matched its caption for 64.5% of them, against 57.5% at temperature 1 and 58.0% at
    # 0.7 with guidance 2 (BENCHMARKS.md, 2026-12-03). 256 candidates, as the paper reranks
    # hundreds (512): on `validation` the two CLIPs' pick matched for 82.5-85.5% of the
    # captions from 256 draws against 79.5-83.5% from 128 of the same draws (BENCHMARKS.md,
    # session 17): each doubling of N from 8 gains 1.5-9.5 points, less as N grows;
    # drawing them costs seconds here, in batches of 128 (1.2-1.6× the images/s of 32).
    config.samples = ml_collections.ConfigDict(dict(
        prompts=PROMPTS, candidates=256, keep=4, seed=0, batch_size=128,
        temperature=0.7, top_k=0, top_p=1.0, guidance=1.5))
    return config
