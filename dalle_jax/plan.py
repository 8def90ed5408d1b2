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
`config.task.dvae_workdir`. The step is the training loop's own (`loop.plan_step`).
"""
from __future__ import annotations

import dataclasses
import json
import math
import os

import jax
import numpy as np
from absl import flags
from flax import nnx
from ml_collections import config_flags

from dalle_jax import cli, config_lib, tasks
from dalle_jax.models import dvae as dvae_model
from dalle_jax.sharding import logical, mesh as mesh_lib
from dalle_jax.training import loop

GiB = 2**30

# Peak dense bf16 FLOP/s and memory of one chip, from the vendors' data sheets.
CHIPS = {
    "tpu_v4": (275e12, 32 * GiB),
    "tpu_v5e": (197e12, 16 * GiB),
    "tpu_v5p": (459e12, 95 * GiB),
    "h100": (989e12, 80e9),
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
        peak, _ = CHIPS[chip]
        devices = math.prod(self.mesh.values())
        seconds = self.model_flops_per_step / (devices * peak * mfu)
        return self.tokens_per_step / seconds if seconds > 0 else 0.0

    def fits(self, chip: str) -> bool:
        return self.peak_bytes <= CHIPS[chip][1]


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
              "mask": ((size,), np.bool_)}
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
    for chip, (peak, memory) in CHIPS.items():
        rate = plan.tokens_per_second(chip, mfu)
        fits = "fits" if plan.fits(chip) else "does NOT fit"
        lines.append(f"  {chip:8s} {rate:12.4g} tokens/s, {rate / plan.tokens_per_step:8.3g} "
                     f"steps/s; {fits} in {memory / GiB:.0f} GiB")
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
    flags.mark_flags_as_required(["config"])


def main(argv):
    del argv
    # Before anything asks for a device: this many fake CPU devices stand in for the chips.
    jax.config.update("jax_platforms", "cpu")
    jax.config.update("jax_num_cpu_devices", FLAGS.devices)
    plan, _ = make_plan(FLAGS.config, FLAGS.dvae_config,
                        config_name=os.path.basename(FLAGS["config"].config_filename))
    print(format_plan(plan, FLAGS.mfu))
    if FLAGS.json:
        with open(FLAGS.json, "w") as f:
            json.dump(dataclasses.asdict(plan), f, indent=2)


if __name__ == "__main__":
    define_flags()
    cli.run(main)
