"""The device mesh, built from the config, and multi-host start-up."""
from __future__ import annotations

import math
from typing import Sequence

import jax
from absl import logging


def initialize_distributed(config) -> None:
    """Joins the job's other processes when `config.distributed.enabled` (once: a second call
    does nothing).

    On TPU pods and SLURM/Open MPI clusters JAX discovers the coordinator itself, so empty
    fields mean "auto"; on a CPU or a hand-rolled cluster give all three.
    """
    dist = config.distributed
    if not dist.enabled or jax.distributed.is_initialized():
        return
    if dist.cpu_collectives:
        # Cross-process collectives on CPU devices need an explicit implementation.
        jax.config.update("jax_cpu_collectives_implementation", dist.cpu_collectives)
    jax.distributed.initialize(
        coordinator_address=dist.coordinator_address or None,
        num_processes=dist.num_processes if dist.num_processes > 0 else None,
        process_id=dist.process_id if dist.process_id >= 0 else None,
    )
    logging.info("process %d of %d, %d local devices of %d", jax.process_index(),
                 jax.process_count(), jax.local_device_count(), jax.device_count())


def resolve_mesh_shape(shape: Sequence[int], axes: Sequence[str], num_devices: int) -> tuple[int, ...]:
    """`shape` with its one -1 replaced by whatever makes the product `num_devices`."""
    if len(shape) != len(axes):
        raise ValueError(f"config.mesh.shape {tuple(shape)} has {len(shape)} entries but "
                         f"config.mesh.axes {tuple(axes)} names {len(axes)}")
    if len(set(axes)) != len(axes):
        raise ValueError(f"config.mesh.axes {tuple(axes)} repeats an axis name")
    if sum(s == -1 for s in shape) > 1:
        raise ValueError(f"config.mesh.shape {tuple(shape)} has more than one -1")
    if any(s == 0 or s < -1 for s in shape):
        raise ValueError(f"config.mesh.shape {tuple(shape)} must hold positive sizes or one -1")
    known = math.prod(s for s in shape if s != -1)
    if -1 in shape:
        if num_devices % known:
            raise ValueError(f"config.mesh.shape {tuple(shape)}: {num_devices} devices do not "
                             f"divide by the fixed axes' product {known}")
        shape = tuple(num_devices // known if s == -1 else s for s in shape)
    if math.prod(shape) != num_devices:
        raise ValueError(f"config.mesh.shape {tuple(shape)} needs {math.prod(shape)} devices "
                         f"but {num_devices} are available")
    return tuple(int(s) for s in shape)


def build_mesh(mesh_config, devices: Sequence[jax.Device] | None = None) -> jax.sharding.Mesh:
    """A mesh with the config's axis names; -1 in `mesh.shape` takes the remaining devices.

    Axis types are Auto: under Explicit axes (jax.make_mesh's default) sharding constraints from
    logical-axis rules would act as assertions instead of hints.
    """
    devices = list(devices) if devices is not None else jax.devices()
    wanted = mesh_config.get("num_devices", 0)
    if wanted:
        if wanted > len(devices):
            raise ValueError(f"config.mesh.num_devices={wanted} but only {len(devices)} "
                             "devices are available")
        devices = devices[:wanted]
    axes = tuple(mesh_config.axes)
    shape = resolve_mesh_shape(tuple(mesh_config.shape), axes, len(devices))
    return jax.make_mesh(shape, axes, axis_types=(jax.sharding.AxisType.Auto,) * len(axes),
                         devices=devices)
