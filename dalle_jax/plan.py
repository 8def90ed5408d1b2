"""Plans a training run ahead of time: memory per device and speed, for a mesh of any size.

    python -m dalle_jax.plan --config configs/dalle_12b.py --devices 256 \
        --config.mesh.shape='(2,128,1)' --mfu 0.4

The train step is lowered and compiled for `--devices` simulated CPU devices from abstract
arrays (shapes and shardings only: nothing is allocated, so a 12B model plans on a laptop).
Per device it reports the bytes of parameters, EMA and optimizer state (from their shardings),
the compiled step's own memory analysis (arguments, outputs, temporaries, peak), its FLOPs by
XLA's cost analysis and by the model's formula, and the tokens/s that a given MFU means on
named chips. The byte counts are XLA's CPU buffer assignment for the same sharded program: a
planning estimate for an accelerator, whose compiler fuses and schedules differently.

A task that reads image tokens (the transformer) needs its dVAE's shapes only: `--dvae_config`
(default: the paper's configs/dvae.py) stands in for the trained dVAE of
`config.task.dvae_workdir`. The step is the training loop's own (`loop.plan_step`); a token
cache's table (`config.task.token_cache`, int32 tokens of every training image on every device)
is not counted, as the plan reads no data set.
"""
from __future__ import annotations

import dataclasses
import json
import math

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags
from flax import nnx
from ml_collections import config_flags

from dalle_jax import cli, config_lib, files, tasks
from dalle_jax import workdir as workdir_lib
from dalle_jax.models import attention as attention_lib
from dalle_jax.models import dalle as dalle_model
from dalle_jax.models import dvae as dvae_model
from dalle_jax.sharding import logical, mesh as mesh_lib
from dalle_jax.training import loop
from dalle_jax.training import state as state_lib

GiB = 2**30



@dataclasses.dataclass(frozen=True)
class Chip:
    flops: float  # peak dense bf16 FLOP/s
    memory: float  # bytes of HBM
    bandwidth: float  # HBM bytes/s


# From the vendors' data sheets.
CHIPS = {
    "tpu_v4": Chip(275e12, 32 * GiB, 1228e9),
    "tpu_v5e": Chip(197e12, 16 * GiB, 819e9),
    "tpu_v5p": Chip(459e12, 95 * GiB, 2765e9),
    "h100": Chip(989e12, 80e9, 3350e9),
}


@dataclasses.dataclass
class Plan:
    config_name: str
    mesh: dict[str, int]
    global_batch: int
    tokens_per_example: int  # positions a step trains on per example (1 for image-only tasks)
    # Per device, from the shardings of the train state:
    param_bytes: int
    ema_bytes: int
    optimizer_bytes: int
    # Per device, from the compiled step's memory analysis:
    argument_bytes: int
    output_bytes: int
    alias_bytes: int
    temp_bytes: int
    peak_bytes: int
    # FLOPs of one step: XLA's per-device count, and the model's formula over all devices
    # (XLA counts a scanned layer once, so only the formula measures MFU; 0 = no formula).
    xla_flops_per_device: float
    model_flops_per_step: float

    @property
    def tokens_per_step(self) -> int:
        return self.global_batch * self.tokens_per_example

    def tokens_per_second(self, chip: str, mfu: float) -> float:
        """Training tokens/s on as many `chip`s as the mesh has devices, at `mfu`."""
        devices = math.prod(self.mesh.values())
        seconds = self.model_flops_per_step / (devices * CHIPS[chip].flops * mfu)
        return self.tokens_per_step / seconds if seconds > 0 else 0.0

    def fits(self, chip: str) -> bool:
        return self.peak_bytes <= CHIPS[chip].memory


def per_device_bytes(tree) -> int:
    """Bytes one device holds of a tree of arrays or ShapeDtypeStructs (its largest shard)."""
    total = 0
    for leaf in jax.tree.leaves(tree):
        shard = leaf.sharding.shard_shape(leaf.shape)
        total += math.prod(shard) * leaf.dtype.itemsize
    return total


def abstract_batch(config, mesh, rules) -> dict:
    """ShapeDtypeStructs of one global batch, sharded over the batch axes as the loop's are."""
    size, side = config.data.batch_size, config.data.image_size
    shapes = {"image": ((size, side, side, 3), np.uint8),
              "text": ((size, config.text.length), np.int32),
              "mask": ((size,), np.bool_),
              "index": ((size,), np.int32)}  # read by a token cache only, else pruned
    return {k: jax.ShapeDtypeStruct(shape, dtype,
                                    sharding=logical.batch_sharding(mesh, rules, len(shape)))
            for k, (shape, dtype) in shapes.items()}


def abstract_dvae(dvae_config, compute_dtype: str):
    """The shapes of a dVAE of `dvae_config`, computing in the planned run's dtype."""
    with nnx.use_eager_sharding(False):
        return nnx.eval_shape(lambda: dvae_model.from_config(dvae_config, nnx.Rngs(0),
                                                             dtype=compute_dtype))


def make_plan(config, dvae_config=None, devices=None, config_name: str = ""):
    """(Plan, compiled step) of `config`'s train step on `devices` (default: all)."""
    config_lib.validate(config)
    mesh = mesh_lib.build_mesh(config.mesh, devices)
    logical.validate_rules(config.sharding.rules, mesh.axis_names)
    dvae = abstract_dvae(dvae_config or config_lib.load("dvae"), config.train.compute_dtype)
    task = tasks.get_task(config, dvae=dvae)
    step = loop.plan_step(config, task, mesh)
    state = step.abstract_state
    compiled = step.compile(state, abstract_batch(config, mesh, step.rules))
    memory = compiled.memory_analysis()
    plan = Plan(
        config_name=config_name, mesh=dict(mesh.shape), global_batch=config.data.batch_size,
        tokens_per_example=task.tokens_per_example(),
        param_bytes=per_device_bytes(state.params),
        ema_bytes=0 if state.ema is None else per_device_bytes(state.ema),
        optimizer_bytes=per_device_bytes(state.opt_state),
        argument_bytes=memory.argument_size_in_bytes, output_bytes=memory.output_size_in_bytes,
        alias_bytes=memory.alias_size_in_bytes, temp_bytes=memory.temp_size_in_bytes,
        peak_bytes=peak_bytes(memory),
        xla_flops_per_device=loop.flops_per_step(compiled),
        model_flops_per_step=(task.flops_per_example() or 0.0) * config.data.batch_size)
    return plan, compiled


def peak_bytes(memory) -> int:
    """The step's peak per device: its live arguments and outputs (donated outputs reuse their
    arguments' buffers) plus its temporaries."""
    return (memory.argument_size_in_bytes + memory.output_size_in_bytes
            - memory.alias_size_in_bytes + memory.temp_size_in_bytes)


def readable_bytes(count: float) -> str:
    for unit, size in (("GiB", GiB), ("MiB", 2**20), ("KiB", 2**10)):
        if count >= size:
            return f"{count / size:.2f} {unit}"
    return f"{count:.0f} B"


def format_plan(plan: Plan, mfu: float) -> str:
    gib = lambda b: f"{readable_bytes(b):>11s}"  # noqa: E731
    lines = [
        f"plan for {plan.config_name or 'the config'} on mesh {plan.mesh} "
        f"({math.prod(plan.mesh.values())} devices), global batch {plan.global_batch}",
        "per device:",
        f"  parameters        {gib(plan.param_bytes)}",
        f"  EMA of parameters {gib(plan.ema_bytes)}",
        f"  optimizer state   {gib(plan.optimizer_bytes)}",
        f"  step arguments    {gib(plan.argument_bytes)}  (train state, batch, frozen dVAE)",
        f"  step outputs      {gib(plan.output_bytes)}  ({readable_bytes(plan.alias_bytes)} of "
        "them in donated arguments' buffers)",
        f"  temporaries       {gib(plan.temp_bytes)}",
        f"  peak              {gib(plan.peak_bytes)}",
        f"FLOPs per step: {plan.model_flops_per_step:.4g} by the model's formula (all devices), "
        f"{plan.xla_flops_per_device:.4g} per device by XLA's cost analysis",
        f"at {mfu:.0%} MFU, {plan.tokens_per_step} tokens a step:",
    ]
    for chip, spec in CHIPS.items():
        rate = plan.tokens_per_second(chip, mfu)
        fits = "fits" if plan.fits(chip) else "does NOT fit"
        lines.append(f"  {chip:8s} {rate:12.4g} tokens/s, {rate / plan.tokens_per_step:8.3g} "
                     f"steps/s; {fits} in {spec.memory / GiB:.0f} GiB")
    return "\n".join(lines)


# --- sampling -------------------------------------------------------------------------------

@dataclasses.dataclass
class SamplingPlan:
    config_name: str
    mesh: dict[str, int]
    batch: int  # images drawn at once
    guided: bool  # classifier-free guidance: an unconditional stream beside each image's
    dtype: str  # parameters, compute and key/value cache
    image_length: int  # decode steps per image
    # Per device:
    param_bytes: int
    cache_bytes: int
    decode_temp_bytes: int
    prefill_temp_bytes: int
    peak_bytes: int  # the larger of the prefill's and the decode step's peaks
    # Bytes one decode step reads on a device: every weight of its tensor-parallel slice
    # (weights split over the batch axes, FSDP, are gathered for the step) and the cache
    # entries its attention reads.
    read_bytes_per_step: int

    @property
    def streams(self) -> int:
        return self.batch * (2 if self.guided else 1)

    def images_per_second(self, chip: str, bandwidth_fraction: float) -> float:
        """Images/s when a decode step takes its bytes read at `bandwidth_fraction` of the
        chip's memory bandwidth (decoding a batch this size is bound by memory traffic)."""
        step = self.read_bytes_per_step / (CHIPS[chip].bandwidth * bandwidth_fraction)
        return self.batch / (step * self.image_length)

    def fits(self, chip: str) -> bool:
        return self.peak_bytes <= CHIPS[chip].memory


def cache_read_bytes_per_step(cfg, streams_per_device: int, heads_per_device: int,
                              itemsize: int) -> int:
    """Bytes of keys and values one decode step reads on a device: every layer reads the
    caption and its own window (models/attention.py, `decode_window`), not the whole cache."""
    entries = sum(attention_lib.decode_read_length(kind, cfg.layout) for kind in cfg.layer_kinds)
    return 2 * entries * streams_per_device * heads_per_device * cfg.block.head_dim * itemsize


def gathered_bytes(tree, batch_axes) -> int:
    """Bytes of a device's slice of a tree of sharded arrays once the `batch_axes` are gathered:
    what a step computing on a batch shard reads of each weight."""
    total = 0
    for leaf in jax.tree.leaves(tree):
        spec = [tuple(a for a in ((axes,) if isinstance(axes, str) else axes or ())
                      if a not in batch_axes) or None for axes in leaf.sharding.spec]
        sharding = jax.sharding.NamedSharding(leaf.sharding.mesh, jax.P(*spec))
        total += math.prod(sharding.shard_shape(leaf.shape)) * leaf.dtype.itemsize
    return total


def make_sampling_plan(config, batch: int, guided: bool, dtype: str = "bfloat16",
                       devices=None, config_name: str = "") -> SamplingPlan:
    """The prefill and the decode step of `config`'s transformer, compiled for its mesh on
    `devices` from abstract arrays (nothing allocated), as `Generator` runs them with
    parameters cast to `dtype` and the batch over the mesh's batch axes."""
    config_lib.validate(config)
    mesh = mesh_lib.build_mesh(config.mesh, devices)
    rules = logical.normalize_rules(config.sharding.rules)
    logical.validate_rules(rules, mesh.axis_names)
    ways = logical.batch_axis_size(mesh, rules)
    streams = batch * (2 if guided else 1)
    if batch % ways:
        raise ValueError(f"batch={batch} does not divide over the {ways} batch shards of mesh "
                         f"{dict(mesh.shape)}")
    with nnx.use_eager_sharding(False):
        abstract = nnx.eval_shape(lambda: dalle_model.from_config(config, nnx.Rngs(0),
                                                                  dtype=dtype))
    # As `Generator.from_workdir(dtype=...)` loads it: parameters cast, other variables not.
    graphdef, params, rest = nnx.split(abstract, nnx.Param, ...)
    state = nnx.merge_state(workdir_lib.cast_floating(params, dtype), rest)
    state = state_lib.abstract_arrays(state, logical.state_shardings(state, mesh, rules))
    cache_spec = logical.logical_to_spec(dalle_model.CACHE_NAMES, rules)
    cache = jax.tree.map(
        lambda c: jax.ShapeDtypeStruct(c.shape, c.dtype, sharding=jax.sharding.NamedSharding(
            mesh, logical.fit_spec(cache_spec, c.shape, mesh))),
        jax.eval_shape(lambda: abstract.init_cache(streams)))
    text = jax.ShapeDtypeStruct((streams, config.text.length), np.int32,
                                sharding=logical.batch_sharding(mesh, rules, 2))
    token = jax.ShapeDtypeStruct((streams,), np.int32,
                                 sharding=logical.batch_sharding(mesh, rules, 1))
    position = jax.ShapeDtypeStruct((), np.int32)

    def prefill(state, text, cache):
        return nnx.merge(graphdef, state).prefill(text, cache)

    def decode(state, token, a, cache):
        return nnx.merge(graphdef, state).decode_step(token, a, cache)

    with jax.set_mesh(mesh), nnx.logical_axis_rules(rules):
        prefilled = jax.jit(prefill, donate_argnums=2).lower(state, text, cache).compile()
        stepped = jax.jit(decode, donate_argnums=3).lower(state, token, position,
                                                          cache).compile()
    prefill_memory, decode_memory = prefilled.memory_analysis(), stepped.memory_analysis()
    cfg = abstract.cfg
    streams_per_device = streams // ways
    some_cache = cache[0].image_keys
    heads_per_device = some_cache.sharding.shard_shape(some_cache.shape)[1]
    return SamplingPlan(
        config_name=config_name, mesh=dict(mesh.shape), batch=batch, guided=guided,
        dtype=str(jnp.dtype(dtype)), image_length=cfg.image_length,
        param_bytes=per_device_bytes(state),
        cache_bytes=per_device_bytes(cache),
        decode_temp_bytes=decode_memory.temp_size_in_bytes,
        prefill_temp_bytes=prefill_memory.temp_size_in_bytes,
        peak_bytes=max(peak_bytes(prefill_memory), peak_bytes(decode_memory)),
        read_bytes_per_step=gathered_bytes(state, logical.batch_axes(rules))
        + cache_read_bytes_per_step(cfg, streams_per_device, heads_per_device,
                                    jnp.dtype(some_cache.dtype).itemsize))


def format_sampling_plan(plan: SamplingPlan, bandwidth_fraction: float) -> str:
    gib = lambda b: f"{readable_bytes(b):>11s}"  # noqa: E731
    lines = [
        f"sampling plan for {plan.config_name or 'the config'} on mesh {plan.mesh} "
        f"({math.prod(plan.mesh.values())} devices): {plan.batch} images at once"
        f"{' with guidance' if plan.guided else ''} ({plan.streams} streams), {plan.dtype}",
        "per device:",
        f"  parameters        {gib(plan.param_bytes)}",
        f"  key/value cache   {gib(plan.cache_bytes)}",
        f"  temporaries       {gib(plan.decode_temp_bytes)}  (decode step; prefill "
        f"{readable_bytes(plan.prefill_temp_bytes)})",
        f"  peak              {gib(plan.peak_bytes)}",
        f"  read per decode step {readable_bytes(plan.read_bytes_per_step)} (its slice of every "
        "weight, gathered over the batch axes, and the cache entries its attention reads)",
        f"at {bandwidth_fraction:.0%} of a chip's memory bandwidth, {plan.image_length} decode "
        "steps an image:",
    ]
    for chip, spec in CHIPS.items():
        fits = "fits" if plan.fits(chip) else "does NOT fit"
        lines.append(f"  {chip:8s} {plan.images_per_second(chip, bandwidth_fraction):10.4g} "
                     f"images/s; {fits} in {spec.memory / GiB:.0f} GiB")
    return "\n".join(lines)


FLAGS = flags.FLAGS


def define_flags() -> None:
    """The command's flags, defined only when it runs (importing the module defines none)."""
    config_flags.DEFINE_config_file("config", None, "The training config to plan.",
                                    lock_config=True)
    config_flags.DEFINE_config_file(
        "dvae_config", None, "For a transformer: the dVAE config whose shapes stand in for the "
        "trained dVAE (default: configs/dvae.py, the paper's).", lock_config=True)
    flags.DEFINE_integer("devices", 8, "Simulated devices: the mesh's size.")
    flags.DEFINE_float("mfu", 0.4, "Model FLOPs utilisation assumed for the tokens/s estimates.")
    flags.DEFINE_string("json", "", "Also write the plan as JSON to this file.")
    flags.DEFINE_integer("sample", 0, "Plan sampling instead of training: this many images "
                         "drawn at once (the transformer's prefill and decode step).")
    flags.DEFINE_bool("guidance", True, "Sampling: with classifier-free guidance (twice the "
                      "streams).")
    flags.DEFINE_enum("dtype", "bfloat16", ["bfloat16", "float32"], "Sampling: parameters, "
                      "compute and key/value cache.")
    flags.DEFINE_float("bandwidth", 0.5, "Sampling: fraction of a chip's memory bandwidth "
                       "assumed for the images/s estimates.")
    flags.mark_flags_as_required(["config"])


def main(argv):
    del argv
    # Before anything asks for a device: this many fake CPU devices stand in for the chips.
    jax.config.update("jax_platforms", "cpu")
    jax.config.update("jax_num_cpu_devices", FLAGS.devices)
    name = files.path(FLAGS["config"].config_filename).name
    try:
        if FLAGS.sample:
            plan = make_sampling_plan(FLAGS.config, FLAGS.sample, FLAGS.guidance, FLAGS.dtype,
                                      config_name=name)
            print(format_sampling_plan(plan, FLAGS.bandwidth))
        else:
            plan, _ = make_plan(FLAGS.config, FLAGS.dvae_config, config_name=name)
            print(format_plan(plan, FLAGS.mfu))
    except ValueError as e:
        cli.fail(e)
    if FLAGS.json:
        files.write_text(FLAGS.json, json.dumps(dataclasses.asdict(plan), indent=2))


if __name__ == "__main__":
    define_flags()
    cli.run(main)
