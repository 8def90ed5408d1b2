"""Checkpoints: Orbax, one step = the sharded train state + every host's data-iterator state.

Saving the iterator with the model is what makes a restart continue with the same batches.
Every process writes its own shards (Orbax) and its own iterator file (Grain's handler).
"""
from __future__ import annotations

import dataclasses
import time
from typing import Any

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from jax.experimental import multihost_utils

from dalle_jax import files
from dalle_jax.workdir import DATA, STATE, checkpoint_dir, read_error

UNREADABLE = ".unreadable"  # a step moved aside because it does not read back


class DataCheckpointHandler(grain.checkpoint.CheckpointHandler):
    """Grain's handler (one JSON file of iterator state per process), restorable on another
    process count.

    A training stream stands at the same position in every process (see
    `data.input_pipeline.make_loader`), so when this process has no file of its own, e.g. a run
    written by 2 hosts continued on 1, the saved files must all agree and any of them serves.
    """

    def restore(self, directory, item=None, args=None):
        own = directory / f"process_{jax.process_index()}-of-{jax.process_count()}.json"
        if own.exists():
            return super().restore(directory, item=item, args=args)
        item = item or args.item
        states = {path.read_text() for path in directory.glob("process_*-of-*.json")}
        if len(states) != 1:
            raise ValueError(f"{directory}: the data iterator states of the saving processes "
                             "differ, so they cannot be restored on another process count")
        item.set_state(states.pop().encode())
        item.start_prefetch()
        return item


@ocp.args.register_with_handler(DataCheckpointHandler, for_save=True)
@dataclasses.dataclass
class DataSave(ocp.args.CheckpointArgs):
    item: Any


@ocp.args.register_with_handler(DataCheckpointHandler, for_restore=True)
@dataclasses.dataclass
class DataRestore(ocp.args.CheckpointArgs):
    item: Any


def manager(workdir: str, *, keep: int = 3, every: int = 1) -> ocp.CheckpointManager:
    """Saves every `every` steps (and, as Orbax does, the first step a run saves at, which
    shows early that the workdir is writable); with `every` = 0 only forced saves (the end of
    training, preemption)."""
    policies = ocp.checkpoint_managers
    save_policy = None if every > 0 else policies.AnySavePolicy(
        [policies.PreemptionCheckpointingPolicy()])
    return ocp.CheckpointManager(
        checkpoint_dir(workdir),
        item_handlers={STATE: ocp.StandardCheckpointHandler(), DATA: DataCheckpointHandler()},
        options=ocp.CheckpointManagerOptions(
            max_to_keep=keep, save_interval_steps=max(every, 1),
            save_decision_policy=save_policy, enable_async_checkpointing=True))


def save(mgr: ocp.CheckpointManager, step: int, state, batches, *, force: bool = False) -> bool:
    """Starts an asynchronous save (when `step` is due, or `force`); True if one started."""
    return mgr.save(step, force=force, args=ocp.args.Composite(**{
        STATE: ocp.args.StandardSave(state),
        DATA: DataSave(batches)}))


def save_state(workdir: str, step: int, state) -> None:
    """A checkpoint of the train state alone (no data iterator: a converted model, a
    benchmark's), written before this returns."""
    mgr = manager(workdir, keep=1)
    try:
        if not mgr.save(step, force=True, args=ocp.args.Composite(
                **{STATE: ocp.args.StandardSave(state)})):
            raise RuntimeError(f"Orbax declined to save step {step} in {workdir}")
        mgr.wait_until_finished()
    finally:
        mgr.close()


def check_space(workdir: str, abstract_state) -> None:
    """Fails now, not at the first save an hour later, when the workdir's disk cannot hold one
    checkpoint of the train state (all of it: on a shared file system every host writes its
    part)."""
    needed = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(abstract_state))
    free = files.free_bytes(workdir)
    if free is not None and free < needed:
        raise files.NotWritable(
            f"workdir {workdir!r} has {free / 2**20:.1f} MiB free; one checkpoint of this "
            f"train state takes {needed / 2**20:.1f} MiB")


def restore_newest_readable(mgr: ocp.CheckpointManager, abstract_state, batches):
    """The train state of the newest step that reads back whole (see `restore`).

    A step that does not (a truncated or missing file: a disk fault, a copy cut short, a
    hand-edited workdir; an interrupted save never counts, Orbax publishes a step only when
    it is complete) is moved aside to `<step>.unreadable`, with a one-line warning naming
    it, and the step before it is tried. The processes agree on the outcome, as each reads
    only its own shards (untested with several processes: one failing inside Orbax's restore
    while the others wait at its barriers would still hang).
    """
    directory = str(mgr.directory)
    for leftover in sorted(files.path(directory).glob("*.orbax-checkpoint-tmp*")):
        logging.warning("%s: a save that was interrupted before it finished; ignored",
                        leftover)
    for step in sorted(mgr.all_steps(), reverse=True):
        try:
            state, reason = restore(mgr, abstract_state, batches, step), None
        except Exception as e:  # noqa: BLE001 - whatever the reader raised, the step is bad
            state, reason = None, read_error(e)
        if _everywhere(reason is None):
            return state
        aside = _move_aside(mgr, step)
        logging.warning("checkpoint step %d of %s does not read back (%s); moved to %s, "
                        "resuming from the step before it", step, directory,
                        reason or "on another process", aside)
    raise FileNotFoundError(f"no checkpoint in {directory} reads back (each was moved aside "
                            f"as <step>{UNREADABLE})")


def _everywhere(ok: bool) -> bool:
    """Whether `ok` holds on every process (each reads its own shards, so one may fail alone)."""
    if jax.process_count() == 1:
        return ok
    return bool(np.all(multihost_utils.process_allgather(np.asarray(ok))))


def _move_aside(mgr: ocp.CheckpointManager, step: int) -> str:
    """Renames step `step` out of Orbax's sight (process 0; the others wait)."""
    source = files.join(str(mgr.directory), str(step))
    target = f"{source}{UNREADABLE}-{time.strftime('%Y%m%d-%H%M%S')}"
    if jax.process_index() == 0:
        files.path(source).rename(target)
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(f"move aside step {step}")
    mgr.reload()
    return target


def restore(mgr: ocp.CheckpointManager, abstract_state, batches, step: int | None = None):
    """The train state at `step` (default: the latest), sharded as `abstract_state` says;
    `batches` is repositioned to continue where that step left off."""
    step = mgr.latest_step() if step is None else step
    restored = mgr.restore(step, args=ocp.args.Composite(**{
        STATE: ocp.args.StandardRestore(abstract_state),
        DATA: DataRestore(batches)}))
    return restored[STATE]
