"""Every stage in one command: tokenizer -> dVAE -> CLIP -> transformer -> samples.

    python train.py --config configs/pipeline_mini.py --workdir workdirs/mini

A pipeline config holds one full stage config per model (`config.dvae`, `config.clip`,
`config.grey_clip`, `config.dalle`, each what `train.py` would take on its own), the caption
settings they share (`config.text`) and what to draw at the end (`config.samples`). In the
workdir:

    tokenizer.model      the caption tokenizer, trained once and used by every stage
    dvae/ clip/ dalle/   each stage's own workdir (checkpoints, metrics, image grids)
    grey_clip/           a CLIP of grey views, the second reranker (drop it from
                         `config.stages` to rerank with `clip/` alone)
    samples/             best-of-N images for `config.samples.prompts`, reranked by the CLIPs

A stage whose checkpoint has reached its `train.steps` is skipped; an interrupted one resumes
where it stopped (the loop's own resume), and a stage stopped by SIGTERM stops the pipeline,
so running the same command again continues it.
"""
from __future__ import annotations

import os
import time

import ml_collections
from absl import logging

STAGES = ("dvae", "clip", "grey_clip", "dalle")
# The CLIPs that rerank the samples, together (models/scorer.py, ClipCommittee): the CLIP and
# one trained on grey views only, which reads shapes whatever their colour.
CLIP_STAGES = ("clip", "grey_clip")
TOKENIZER_FILENAME = "tokenizer.model"


def is_pipeline(config) -> bool:
    return "stages" in config


def stage_configs(config, workdir: str) -> dict[str, ml_collections.ConfigDict]:
    """Each stage's config as the pipeline runs it: the shared caption settings and
    tokenizer, and the transformer reading the pipeline's own dVAE."""
    unknown = [s for s in config.stages if s not in STAGES]
    if unknown or not config.stages:
        raise ValueError(f"config.stages={tuple(config.stages)!r}: each must be one of {STAGES}")
    configs = {}
    for stage in config.stages:
        stage_config = config[stage].copy_and_resolve_references()
        with stage_config.unlocked():
            stage_config.text.update(config.text.to_dict())
            stage_config.text.tokenizer = os.path.join(workdir, TOKENIZER_FILENAME)
            if stage == "dalle":
                stage_config.task.dvae_workdir = os.path.join(workdir, "dvae")
        configs[stage] = stage_config
    if "dalle" in configs and "dvae" not in configs:
        raise ValueError("config.stages has 'dalle' without 'dvae': the transformer needs the "
                         "pipeline's dVAE")
    return configs


def validate(config, workdir: str = "") -> dict[str, ml_collections.ConfigDict]:
    """The stage configs, each checked before any stage runs: a bad value in the last stage
    is an error now, not after the first stages have trained."""
    from dalle_jax import config_lib

    configs = stage_configs(config, workdir)
    for stage, stage_config in configs.items():
        try:
            config_lib.validate(stage_config)
        except ValueError as e:
            raise ValueError(f"stage {stage!r} (config.{stage}): {e}") from None
    return configs


def trained_steps(workdir: str) -> int:
    """The latest checkpointed step of a stage's workdir (0 when it has none)."""
    from dalle_jax.training import checkpoint

    if not os.path.isdir(checkpoint.checkpoint_dir(workdir)):
        return 0
    mgr = checkpoint.manager(workdir, read_only=True)
    try:
        return mgr.latest_step() or 0
    finally:
        mgr.close()


def train_tokenizer(config, workdir: str) -> None:
    """The shared tokenizer, trained on the first stage's training captions (all stages read
    the same data set)."""
    from dalle_jax import run

    first = config[config.stages[0]].copy_and_resolve_references()
    with first.unlocked():
        first.text.update(config.text.to_dict())
        first.text.tokenizer = ""
    run.load_or_train_tokenizer(first, workdir)


def run_stage(stage: str, config, workdir: str) -> bool:
    """Trains one stage to its end; False if it stopped early (SIGTERM, a time slot)."""
    from dalle_jax.training import loop

    done = trained_steps(workdir)
    if done >= config.train.steps:
        print(f"[{stage}] already trained to step {done}: skipped ({workdir})")
        return True
    print(f"[{stage}] training {config.train.steps - done} steps"
          f"{f' from step {done}' if done else ''} -> {workdir}", flush=True)
    start = time.perf_counter()
    state = loop.train(config, workdir)
    step = int(state.step)
    print(f"[{stage}] step {step} in {(time.perf_counter() - start) / 60:.1f} min", flush=True)
    return step >= config.train.steps


def clip_workdirs(workdir: str) -> list[str]:
    """The CLIP stages a pipeline workdir holds (clip/, grey_clip/): its rerankers."""
    return [os.path.join(workdir, stage) for stage in CLIP_STAGES
            if os.path.isfile(os.path.join(workdir, stage, "config.json"))]


def draw_samples(config, workdir: str) -> str:
    """Best-of-N samples for `config.samples.prompts`, reranked by the pipeline's CLIPs."""
    from dalle_jax.sampling.generator import Generator
    from dalle_jax.sampling.outputs import write_samples

    s = config.samples
    clip_workdir = [os.path.join(workdir, stage) for stage in CLIP_STAGES
                    if stage in config.stages]
    generate = Generator.from_workdir(os.path.join(workdir, "dalle"), batch_size=s.batch_size,
                                      clip_workdir=clip_workdir)
    settings = dict(temperature=s.temperature, top_k=s.top_k, top_p=s.top_p, guidance=s.guidance)
    prompts = list(s.prompts)
    out = os.path.join(workdir, "samples")
    if not clip_workdir:
        images = generate(prompts, s.keep, s.seed, **settings)
        write_samples(out, prompts, images, seed=s.seed, settings=settings)
    else:
        result = generate.best_of(prompts, s.candidates, s.keep, s.seed, **settings)
        write_samples(out, prompts, result.images, seed=s.seed, reranked=result,
                      settings=dict(settings, rerank=s.candidates, keep=s.keep))
    return out


def run_pipeline(config, workdir: str) -> str | None:
    """Runs every stage that is not done yet; the samples directory, or None if a stage
    stopped early (run the same command again to continue)."""
    configs = validate(config, workdir)
    start = time.perf_counter()
    os.makedirs(workdir, exist_ok=True)
    logging.info("pipeline stages %s in %s", tuple(configs), workdir)
    train_tokenizer(config, workdir)
    for stage, stage_config in configs.items():
        if not run_stage(stage, stage_config, os.path.join(workdir, stage)):
            print(f"[{stage}] stopped before its last step; run the same command to continue")
            return None
    if "dalle" not in configs:
        return None
    drawing = time.perf_counter()
    samples = draw_samples(config, workdir)
    now = time.perf_counter()
    print(f"[samples] {len(config.samples.prompts)} captions in {(now - drawing) / 60:.1f} min; "
          f"this run of the pipeline took {(now - start) / 60:.1f} min", flush=True)
    return samples
