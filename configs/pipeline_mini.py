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
    # The job's minutes on 2 CPU cores, spent where the caption-match rate
    # gains (BENCHMARKS.md, "The main job: wall time and stage times"): CLIP trains 6000 steps,
    # twice `clip_mini`'s, as it reads relations only after about 3000 (BENCHMARKS.md, "CLIP
    # quality: retrieval and zero-shot"), and the dVAE pays with 6000 instead of 12,750, since
    # a sharper dVAE did not move the match rates. Its schedules keep the proportions of the
    # 8500-step one (KL warm-up 500, temperature at its end value at 65% of the run).
    config.dvae.train.steps = 6000
    config.dvae.task.kl_warmup_steps = 500
    config.dvae.task.kl_decay_steps = 5500
    config.dvae.task.temperature_steps = 3900
    config.clip.train.steps = 6000
    # A second CLIP that sees grey images with colourless captions only, so it reads shapes
    # whatever their colour, the main CLIP's weak point on unseen colour-shape pairs; reranking
    # beside the main one (models/scorer.py, ClipCommittee), it raises the picks for a few
    # minutes of training (BENCHMARKS.md, "Caption match: dalle_jax.evaluate").
    config.grey_clip.data.augment.greyscale = 1.0
    config.grey_clip.data.augment.colour_words = COLOURS
    config.grey_clip.train.steps = 1000
    # 5000 steps, not 2500: the transformer's own draws are what a user sees without
    # reranking, and doubling its steps took their match rate on `validation` (guidance 1.5)
    # from 33% to 59% (BENCHMARKS.md, "What limits the transformer's own samples"); its steps are where
    # the job's minutes gain most.
    config.dalle.train.steps = 5000
    # Plain causal attention in every layer: at 8×8 image tokens the paper's row, column and
    # conv layers save no work, and seeing the whole image drawn so far draws the right shape
    # for unseen colour-shape pairs more often (`heldout` shape 31% against 22% of plain draws
    # at guidance 1.5; BENCHMARKS.md, "What limits the transformer's own samples").
    # `dalle_mini` itself and the pod-sized configs keep the paper's layers.
    config.dalle.model.layers = "causal"
    # Temperature 0.7 with guidance 1.5: the draws CLIP picked from best (BENCHMARKS.md, "What
    # was tried and did not help"). 256 candidates, as each doubling of N still raises the pick
    # (BENCHMARKS.md, "Caption match: dalle_jax.evaluate"); drawn in batches of 128.
    config.samples = ml_collections.ConfigDict(dict(
        prompts=PROMPTS, candidates=256, keep=4, seed=0, batch_size=128,
        temperature=0.7, top_k=0, top_p=1.0, guidance=1.5))
    return config
