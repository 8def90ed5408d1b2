"""A workdir, local or in a bucket: the one place that knows its files and how to read them.

A **run** workdir is what training one stage leaves (`python train.py --config ...`):

    config.json       the run's resolved config (its `task.name` says which stage it holds)
    tokenizer.model   the caption tokenizer, unless `text.tokenizer` points elsewhere
    checkpoints/N/    Orbax steps: item `state` (the train state: params, ema, rest, opt_state,
                      counters) and item `data` (every host's data-iterator state)
    metrics.jsonl, tensorboard/, images/

A **pipeline** workdir (`configs/pipeline_*.py`) holds one run per stage, `dvae/`, `clip/`,
`grey_clip/` and `dalle/`, beside the tokenizer they share and `samples/`.

Paths in a written config that point into the same (pipeline) workdir are stored relative to
the run's own directory, and every other path absolute, so a workdir can be read from any
current directory and still reads after it is moved or copied as a whole.

Loading a model for inference restores only the parameters it uses (the EMA copy or the raw
one, and the model's non-parameter variables) with Orbax's partial restore: no optimizer is
built and no optimizer moment is read.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import functools
import json
import math
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import orbax.checkpoint as ocp
from absl import logging
from flax import nnx

from dalle_jax import files
from dalle_jax.sharding import logical
from dalle_jax.text.tokenizer import Tokenizer

CONFIG_FILENAME = "config.json"
TOKENIZER_FILENAME = "tokenizer.model"
CHECKPOINTS = "checkpoints"
STATE, DATA = "state", "data"  # the items of a checkpoint step

# The stages of a pipeline workdir, in training order, and those that rerank samples together.
PIPELINE_STAGES = ("dvae", "clip", "grey_clip", "dalle")
RERANKER_STAGES = ("clip", "grey_clip")
MODEL_NAMES = {"dvae": "dVAE", "dalle": "transformer", "clip": "CLIP"}  # by config.task.name

# Config values that are paths, made relative or absolute when a config is written.
PATH_KEYS = ("text.tokenizer", "task.dvae_workdir", "data.data_dir", "data.folder")


# --- paths ----------------------------------------------------------------------------------

def absolute(path: str) -> str:
    return files.absolute(path)


def checkpoint_dir(workdir: str) -> str:
    return files.join(absolute(workdir), CHECKPOINTS)


def tokenizer_path(config, workdir: str) -> str:
    """The run's tokenizer: `config.text.tokenizer`, or the workdir's own."""
    return config.text.tokenizer or files.join(workdir, TOKENIZER_FILENAME)


def _get(config, dotted: str):
    section, key = dotted.split(".")
    return config[section].get(key) if section in config else None


def portable_paths(config, workdir: str, root: str | None = None) -> ml_collections.ConfigDict:
    """A copy of `config` whose path values are relative to `workdir` when they lie inside
    `root` (default: `workdir`; a pipeline stage passes the pipeline's directory) and absolute
    otherwise. Paths given relative are taken from the current directory."""
    config = ml_collections.ConfigDict(config.to_dict())
    workdir = absolute(workdir)
    root = absolute(root or workdir)
    for dotted in PATH_KEYS:
        value = _get(config, dotted)
        if not value:
            continue
        path = absolute(value)
        section, key = dotted.split(".")
        config[section][key] = (files.relative(path, workdir) if files.inside(path, root)
                                else path)
    return config


def resolved_paths(config, workdir: str) -> ml_collections.ConfigDict:
    """`config` as read from `workdir`: relative path values made absolute from it."""
    for dotted in PATH_KEYS:
        value = _get(config, dotted)
        if value and not files.is_remote(value) and not value.startswith("/"):
            section, key = dotted.split(".")
            config[section][key] = absolute(files.join(absolute(workdir), value))
    return config


# --- configs --------------------------------------------------------------------------------

def write_config(config, workdir: str, root: str | None = None) -> None:
    """`workdir/config.json`, its paths portable (see `portable_paths`); process 0 only."""
    if jax.process_index() != 0:
        return
    text = portable_paths(config, workdir, root).to_json_best_effort(indent=2)
    files.write_text(files.join(workdir, CONFIG_FILENAME), text)


def read_config(workdir: str) -> ml_collections.ConfigDict:
    path = files.join(workdir, CONFIG_FILENAME)
    if not files.is_file(path):
        raise FileNotFoundError(f"{path} does not exist: {workdir!r} is not a training workdir")
    return resolved_paths(ml_collections.ConfigDict(json.loads(files.read_text(path))), workdir)


def is_run(workdir: str) -> bool:
    return files.is_file(files.join(workdir, CONFIG_FILENAME))


def is_pipeline(workdir: str) -> bool:
    """A pipeline workdir: no config of its own, one run per stage below it."""
    return not is_run(workdir) and any(is_run(pipeline_stage(workdir, stage))
                                       for stage in PIPELINE_STAGES)


def pipeline_stage(workdir: str, stage: str) -> str:
    return files.join(workdir, stage)


def rerankers(workdir: str) -> list[str]:
    """The CLIP runs of a pipeline workdir (clip/, grey_clip/), the ones trained."""
    workdir = absolute(workdir)
    return [pipeline_stage(workdir, stage) for stage in RERANKER_STAGES
            if is_run(pipeline_stage(workdir, stage))]


def transformer_and_rerankers(workdir: str, clip_workdir: str | Sequence[str] | None = None
                              ) -> tuple[str, list[str]]:
    """(the transformer's run, the CLIP runs that rerank its samples) of a pipeline workdir
    (its dalle/ and CLIPs) or a transformer's run (`clip_workdir`, none by default); a given
    `clip_workdir` (one or several; [] for none) replaces the pipeline's CLIPs."""
    workdir = absolute(workdir)
    if clip_workdir is not None:
        clip_workdir = [clip_workdir] if isinstance(clip_workdir, str) else list(clip_workdir)
    if is_pipeline(workdir):
        dalle = pipeline_stage(workdir, "dalle")
        if not is_run(dalle):
            raise FileNotFoundError(f"pipeline workdir {workdir!r} has no trained transformer "
                                    "(dalle/): run the pipeline to its end first")
        return dalle, rerankers(workdir) if clip_workdir is None else clip_workdir
    if not is_run(workdir):
        raise FileNotFoundError(f"{workdir!r} is neither a pipeline workdir (with dalle/) nor "
                                f"a run's workdir (with {CONFIG_FILENAME})")
    return workdir, clip_workdir or []


# --- checkpoints ----------------------------------------------------------------------------

def latest_step(workdir: str) -> int | None:
    """The newest finished checkpoint step of a run (None when it has none)."""
    return max(ocp.utils.checkpoint_steps(checkpoint_dir(workdir)), default=None)


class Run:
    """A trained stage's workdir: its config, tokenizer and checkpoints.

        run = Run(path, expect="dvae")      # a one-line error if it holds another stage
        model = run.load_model(dvae.from_config)
    """

    def __init__(self, path: str, expect: str | None = None):
        self.path = absolute(path)
        self.config = read_config(self.path)
        self.stage = self.config.task.name
        self.loaded_step: int | None = None  # the step `load_model` read last
        if expect is not None and self.stage != expect:
            held = MODEL_NAMES.get(self.stage, repr(self.stage))
            raise ValueError(f"{path!r} holds a {held} run, not a {MODEL_NAMES[expect]}")

    @property
    def tokenizer_path(self) -> str:
        return tokenizer_path(self.config, self.path)

    def tokenizer(self) -> Tokenizer:
        return Tokenizer(self.tokenizer_path)

    def latest_step(self) -> int | None:
        return latest_step(self.path)

    def load_model(self, build: Callable[..., nnx.Module], *, use_ema: bool = True,
                   step: int | None = None, dtype: str | None = None,
                   param_dtype: str | None = None, mesh=None, rules=None) -> nnx.Module:
        """The trained model: `build(config, rngs, dtype=...)` (a model module's
        `from_config`) gives its structure, then only the parameters it uses are read: the EMA
        copy (or the raw one with `use_ema=False`, or when the run kept no EMA) and the
        non-parameter variables. `dtype` overrides the run's compute dtype; `param_dtype`
        (e.g. bfloat16 for sampling) casts the floating-point parameters as they are read,
        once, so they take that dtype's memory. Arrays land on the first device, or sharded
        over `mesh` by the logical-axis `rules` (default: the run's own), each device reading
        only its shards."""
        steps = sorted(ocp.utils.checkpoint_steps(checkpoint_dir(self.path)), reverse=True)
        if step is None and not steps:
            raise FileNotFoundError(
                f"no checkpoint in {checkpoint_dir(self.path)}: train this stage first "
                f"(python train.py --config ... --workdir {self.path})")
        dtype = dtype or self.config.train.compute_dtype
        with nnx.use_eager_sharding(False):
            abstract = nnx.eval_shape(lambda: build(self.config, nnx.Rngs(0), dtype=dtype))
        graphdef, params, rest = nnx.split(abstract, nnx.Param, ...)
        if param_dtype is not None:
            params = cast_floating(params, param_dtype)
        source = "ema" if use_ema and self.config.optimizer.ema_decay > 0 else "params"
        target = {source: params, "rest": rest}
        target = _with_shardings(target, mesh, rules or self.config.sharding.rules)
        # The newest step that reads back, unless one is asked for by number.
        for index, candidate in enumerate([step] if step is not None else steps):
            try:
                restored = _restore_subtree(
                    files.join(checkpoint_dir(self.path), str(candidate), STATE), target)
                break
            except Exception as e:  # noqa: BLE001 - whatever the reader raised, say which step
                reason = read_error(e)
                if step is not None or index == len(steps) - 1:
                    raise FileNotFoundError(f"checkpoint step {candidate} of {self.path} does "
                                            f"not read back ({reason})") from None
                logging.warning("checkpoint step %d of %s does not read back (%s); loading the "
                                "step before it", candidate, self.path, reason)
        logging.info("loaded the %s parameters of step %d from %s", source, candidate,
                     self.path)
        self.loaded_step = candidate
        return nnx.merge(graphdef, restored[source], restored["rest"])


def read_error(error: Exception) -> str:
    """One line about why a checkpoint did not read back (readers raise pages of detail)."""
    first = (str(error).strip().splitlines() or [""])[0][:200]
    return f"{type(error).__name__}: {first}" if first else type(error).__name__


def cast_floating(abstract, dtype):
    """ShapeDtypeStructs with every floating-point leaf in `dtype` (what a restore then reads
    them as)."""
    return jax.tree.map(lambda a: jax.ShapeDtypeStruct(
        a.shape, dtype if jnp.issubdtype(a.dtype, jnp.floating) else a.dtype), abstract)


def _with_shardings(abstract, mesh, rules):
    """ShapeDtypeStructs carrying where each array goes: one device, or `mesh` by `rules`."""
    if mesh is None:
        device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        shardings = jax.tree.map(lambda _: device, abstract)
    else:
        shardings = {k: logical.state_shardings(v, mesh, rules) for k, v in abstract.items()}
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                        abstract, shardings)


@functools.cache
def _release_freed_buffers() -> None:
    """Has glibc give every freed buffer of 1 MiB or more back to the system. By default it
    raises that threshold after each large free (up to 32 MiB), so the buffers a checkpoint
    is read through would stay in the heap beside the arrays made from them (about 1.5x the
    parameters at the peak, against 1.2x). No effect with another C library."""
    libc = ctypes.util.find_library("c")
    mallopt = getattr(ctypes.CDLL(libc), "mallopt", None) if libc else None
    if mallopt is not None:
        mallopt(-3, 1 << 20)  # M_MMAP_THRESHOLD


def _restore_subtree(directory: str, target: dict[str, nnx.State]) -> dict[str, nnx.State]:
    """The subtrees of a saved train state that `target` names, restored as it says (shapes,
    dtypes, shardings); everything else in the checkpoint is neither read nor allocated.

    Every array passes through host buffers on its way to its devices, and the copy to the
    device outlives Orbax's own limit on reads in flight; so the arrays are read in rounds of
    about a sixteenth of the whole (at least the largest array), each round finished before
    the next starts, and freed buffers go back to the system (`_release_freed_buffers`): the
    peak stays near the parameters' own size (BENCHMARKS.md, "Loading a trained model")."""
    _release_freed_buffers()
    leaves = [(name, path, variable) for name, state in target.items()
              for path, variable in nnx.to_flat_state(state)]
    sizes = [math.prod(v.sharding.shard_shape(v.shape)) * v.dtype.itemsize
             for _, _, v in leaves]
    budget = max(max(sizes, default=0), sum(sizes) // 16)
    rounds, size = [[]], 0
    for leaf, leaf_size in zip(leaves, sizes):
        if rounds[-1] and size + leaf_size > budget:
            rounds.append([])
            size = 0
        rounds[-1].append(leaf)
        size += leaf_size
    restored = {name: [] for name in target}
    checkpointer = ocp.PyTreeCheckpointer()
    for chunk in rounds:
        item = {name: nnx.from_flat_state([(p, v) for n, p, v in chunk if n == name])
                for name in dict.fromkeys(n for n, _, _ in chunk)}
        out = checkpointer.restore(directory, args=ocp.args.PyTreeRestore(
            item=item, restore_args=ocp.checkpoint_utils.construct_restore_args(item),
            partial_restore=True))
        jax.block_until_ready(out)
        for name, state in out.items():
            restored[name].extend(nnx.to_flat_state(state))
    return {name: nnx.from_flat_state(flat) for name, flat in restored.items()}
