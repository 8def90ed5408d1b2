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

(`dalle_jax/workdir.py` knows this layout and reads it back.)

A stage whose checkpoint has reached its `train.steps` is skipped; an interrupted one resumes
where it stopped (the loop's own resume), and a stage stopped by SIGTERM stops the pipeline,
so running the same command again continues it.
"""
from __future__ import annotations

import time

import ml_collections
import numpy as np
from absl import logging

from dalle_jax import config_lib, files, tasks
from dalle_jax import workdir as workdir_lib
from dalle_jax.data import input_pipeline
from dalle_jax.models import dvae as dvae_model
from dalle_jax.sampling.generator import Generator
from dalle_jax.sampling.outputs import write_samples
from dalle_jax.sharding import mesh as mesh_lib
from dalle_jax.tasks import dalle as dalle_task
from dalle_jax.tasks.task import Task
from dalle_jax.training import loop, setup

STAGES = workdir_lib.PIPELINE_STAGES
ENCODE_BATCH = 256  # images a call when a token cache encodes the training split


def is_pipeline(config) -> bool:
    return "stages" in config


def make_task(config, dvae=None) -> Task:
    """The task of a stage's config, given what it needs from an earlier stage: the trained
    dVAE of `config.task.dvae_workdir` (EMA weights, computing in this run's dtype; `dvae`:
    one to use instead) and, with `config.task.token_cache`, its tokens of every training
    image."""
    if dvae is None and config.task.get("dvae_workdir"):
        dvae = workdir_lib.Run(config.task.dvae_workdir, expect="dvae").load_model(
            dvae_model.from_config, dtype=config.train.compute_dtype)
    token_table = None
    if dvae is not None and config.task.get("token_cache", False):
        config_lib.validate(config)  # before minutes of encoding, not after
        token_table = encode_training_split(config, dvae)
    return tasks.get_task(config, dvae=dvae, token_table=token_table)


def encode_training_split(config, dvae) -> np.ndarray:
    """The dVAE's tokens of every training image, by position in the split (each process
    encodes the whole split: the cache is meant for small data sets)."""
    start = time.perf_counter()
    setup.prepare_data(config.data)
    views = input_pipeline.evaluation_views(config.data, config.data.train_split,
                                            batch_size=ENCODE_BATCH)
    table = dalle_task.encode_all(dvae, views)
    logging.info("token cache: %d training images encoded in %.1f s (%.1f MB)", len(table),
                 time.perf_counter() - start, table.nbytes / 1e6)
    return table


def train_stage(config, workdir: str, *, root: str | None = None, **kwargs):
    """Trains one stage's config in `workdir` (the loop's `train`, with the stage's task).
    The hosts join first: a task's trained inputs load only after that."""
    mesh_lib.initialize_distributed(config)
    return loop.train(config, workdir, make_task(config), root=root, **kwargs)


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
            stage_config.text.tokenizer = files.join(workdir, workdir_lib.TOKENIZER_FILENAME)
            if stage == "dalle":
                stage_config.task.dvae_workdir = workdir_lib.pipeline_stage(workdir, "dvae")
        configs[stage] = stage_config
    if "dalle" in configs and "dvae" not in configs:
        raise ValueError("config.stages has 'dalle' without 'dvae': the transformer needs the "
                         "pipeline's dVAE")
    return configs


def validate(config, workdir: str = "") -> dict[str, ml_collections.ConfigDict]:
    """The stage configs, each checked before any stage runs: a bad value in the last stage
    is an error now, not after the first stages have trained."""
    configs = stage_configs(config, workdir)
    for stage, stage_config in configs.items():
        try:
            config_lib.validate(stage_config)
        except ValueError as e:
            raise ValueError(f"stage {stage!r} (config.{stage}): {e}") from None
    return configs


def train_tokenizer(config, workdir: str) -> None:
    """The shared tokenizer, trained on the first stage's training captions (all stages read
    the same data set)."""
    first = config[config.stages[0]].copy_and_resolve_references()
    with first.unlocked():
        first.text.update(config.text.to_dict())
        first.text.tokenizer = ""
    setup.load_or_train_tokenizer(first, workdir)


def run_stage(stage: str, config, workdir: str, root: str) -> bool:
    """Trains one stage to its end; False if it stopped early (SIGTERM, a time slot)."""
    done = workdir_lib.latest_step(workdir) or 0
    if done >= config.train.steps:
        logging.info("[%s] already trained to step %d: skipped (%s)", stage, done, workdir)
        return True
    logging.info("[%s] training %d steps%s -> %s", stage, config.train.steps - done,
                 f" from step {done}" if done else "", workdir)
    start = time.perf_counter()
    state = train_stage(config, workdir, root=root)
    step = int(state.step)
    logging.info("[%s] step %d in %.1f min", stage, step, (time.perf_counter() - start) / 60)
    return step >= config.train.steps


def draw_samples(config, workdir: str) -> str:
    """Best-of-N samples for `config.samples.prompts`, reranked by the pipeline's CLIPs."""
    s = config.samples
    clip_workdir = [workdir_lib.pipeline_stage(workdir, stage)
                    for stage in workdir_lib.RERANKER_STAGES if stage in config.stages]
    generate = Generator.from_workdir(workdir, batch_size=s.batch_size, clip_workdir=clip_workdir)
    settings = dict(temperature=s.temperature, top_k=s.top_k, top_p=s.top_p, guidance=s.guidance)
    prompts = list(s.prompts)
    out = files.join(workdir, "samples")
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
    files.make_dirs(workdir)
    logging.info("pipeline stages %s in %s", tuple(configs), workdir)
    train_tokenizer(config, workdir)
    for stage, stage_config in configs.items():
        stage_dir = workdir_lib.pipeline_stage(workdir, stage)
        if not run_stage(stage, stage_config, stage_dir, root=workdir):
            logging.warning("[%s] stopped before its last step; run the same command to "
                            "continue", stage)
            return None
    if "dalle" not in configs:
        return None
    drawing = time.perf_counter()
    samples = draw_samples(config, workdir)
    now = time.perf_counter()
    logging.info("[samples] %d captions in %.1f min; this run of the pipeline took %.1f min",
                 len(config.samples.prompts), (now - drawing) / 60, (now - start) / 60)
    return samples
