"""Checkpoints: Orbax, one step = the sharded train state + every host's data-iterator state.

Saving the iterator with the model is what makes a restart continue with the same batches.
Every process writes its own shards (Orbax) and its own iterator file (Grain's handler).
"""
from __future__ import annotations

import os

import grain
import orbax.checkpoint as ocp

STATE, DATA = "state", "data"


def checkpoint_dir(workdir: str) -> str:
    return os.path.join(os.path.abspath(workdir), "checkpoints")


def manager(workdir: str, *, keep: int = 3, every: int = 1, read_only: bool = False
            ) -> ocp.CheckpointManager:
    return ocp.CheckpointManager(
        checkpoint_dir(workdir),
        item_handlers={STATE: ocp.StandardCheckpointHandler(),
                       DATA: grain.checkpoint.CheckpointHandler()},
        options=ocp.CheckpointManagerOptions(
            max_to_keep=keep, save_interval_steps=every, read_only=read_only,
            create=not read_only, enable_async_checkpointing=True))


def save(mgr: ocp.CheckpointManager, step: int, state, batches, *, force: bool = False) -> bool:
    """Starts an asynchronous save (when `step` is due, or `force`); True if one started."""
    return mgr.save(step, force=force, args=ocp.args.Composite(**{
        STATE: ocp.args.StandardSave(state),
        DATA: grain.checkpoint.CheckpointSave(batches)}))


def restore(mgr: ocp.CheckpointManager, abstract_state, batches, step: int | None = None):
    """The train state at `step` (default: the latest), sharded as `abstract_state` says;
    `batches` is repositioned to continue where that step left off."""
    step = mgr.latest_step() if step is None else step
    restored = mgr.restore(step, args=ocp.args.Composite(**{
        STATE: ocp.args.StandardRestore(abstract_state),
        DATA: grain.checkpoint.CheckpointRestore(batches)}))
    return restored[STATE]


def restore_state_only(workdir: str, abstract_state, step: int | None = None):
    """The train state of a finished run, e.g. to load a trained model for inference."""
    mgr = manager(workdir, read_only=True)
    step = mgr.latest_step() if step is None else step
    if step is None:
        raise FileNotFoundError(f"no checkpoint in {checkpoint_dir(workdir)}: train this stage "
                                f"first (python train.py --config ... --workdir {workdir})")
    restored = mgr.restore(step, args=ocp.args.Composite(
        **{STATE: ocp.args.StandardRestore(abstract_state)}))
    return restored[STATE]
